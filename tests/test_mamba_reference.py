"""The fast Mamba operator against the slow loops written from the equations (every variant)."""

from __future__ import annotations

import pytest
import torch

from implicit_attention.architectures.mamba import mamba_factors
from implicit_attention.architectures.mamba.naive import naive_mamba
from implicit_attention.architectures.mamba.operator import VARIANTS, mamba_block
from implicit_attention.architectures.primitives import conv_right, naive_conv_matrix, segment_sums
from implicit_attention.hooks import capture, select_layers

from conftest import assert_close, left_padded, tiny_mamba


def captured_factors(model, ids, mask, dtype=torch.float64):
    targets = select_layers(model, None)
    with torch.no_grad(), capture(model, targets) as captured:
        model(input_ids=ids, attention_mask=mask)
    return [mamba_factors(r.module, r.inputs, r.attention_mask, dtype) for r in captured]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_kernel,use_conv_bias", [(2, True), (3, False), (4, True), (5, True)])
def test_fast_operator_matches_naive(variant, conv_kernel, use_conv_bias):
    model = tiny_mamba(dtype=torch.float64, conv_kernel=conv_kernel, use_conv_bias=use_conv_bias, seed=1)
    ids, mask = left_padded(batch=2, length=6, seed=conv_kernel)
    for f in captured_factors(model, ids, mask):
        expected_matrix, expected_offset = naive_mamba(f, variant)
        matrix, offset = mamba_block(f, slice(0, f.x.shape[-1]), variant)
        assert_close(matrix, expected_matrix, 1e-12, f"{variant} matrix")
        if offset is None:
            assert torch.count_nonzero(expected_offset) == 0
        else:
            assert_close(offset, expected_offset, 1e-12, f"{variant} offset")


def test_channel_blocks_agree_with_one_block():
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=5)
    f = captured_factors(model, ids, mask)[0]
    whole, _ = mamba_block(f, slice(0, 24), "unified")
    parts = torch.cat([mamba_block(f, slice(s, s + 5), "unified")[0] for s in range(0, 24, 5)], dim=1)
    assert torch.equal(whole, parts)


def test_naive_s6_matrix_is_the_recurrence():
    """S u computed by the matrix equals the sequential selective scan h_t = e^{A dt} h + dt B u, y = C h."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=6)
    f = captured_factors(model, ids, mask)[0]
    S, _ = naive_mamba(f, "s6")
    u = f.ssm_input
    batch, length, channels = u.shape
    y = torch.zeros_like(u)
    for b in range(batch):
        state = torch.zeros(channels, f.A.shape[1], dtype=u.dtype)
        for t in range(length):
            state = torch.exp(f.A * f.dt[b, t, :, None]) * state + f.dt[b, t, :, None] * f.B[b, t] * u[b, t, :, None]
            y[b, t] = state @ f.C[b, t]
    assert_close(torch.einsum("bcij,bjc->bic", S, u), y, 1e-12, "S u vs scan")


def test_conv_matrix_is_pytorch_conv1d():
    model = tiny_mamba(dtype=torch.float64, conv_kernel=4)
    ids = torch.randint(0, 40, (1, 7))
    f = captured_factors(model, ids, None)[0]
    bias = f.conv_bias[:, None] if f.conv_bias is not None else 0
    for d in range(3):
        M = naive_conv_matrix(f.conv_weight, d, f.x.shape[1])
        assert_close(M @ f.x[0, :, d] + bias[d], f.conv_out[0, :, d], 1e-12, "conv")


def test_conv_right_by_hand():
    """T @ M for a 3x3 T and taps w = [w0, w1] (w1 multiplies the current token)."""
    T = torch.tensor([[1.0, 0, 0], [2, 3, 0], [4, 5, 6]], dtype=torch.float64)[None, None]
    w = torch.tensor([[10.0, 100.0]], dtype=torch.float64)
    M = torch.tensor([[100.0, 0, 0], [10, 100, 0], [0, 10, 100]], dtype=torch.float64)
    assert torch.equal(conv_right(T, w)[0, 0], T[0, 0] @ M)


def test_segment_sums_by_hand():
    dt = torch.tensor([1.0, 2.0, 4.0])
    expected = torch.tensor([[0.0, 0, 0], [2, 0, 0], [6, 4, 0]])
    assert torch.equal(segment_sums(dt), expected)


@pytest.mark.parametrize("length,block", [(5, 2), (33, 4), (40, 16), (100, 4), (130, 16)])
def test_tiled_s6_matrices_equal_the_direct_ones(length, block):
    """The hierarchical tiles (exponents <= 0, small products) give S_d entry for entry."""
    from implicit_attention.architectures.mamba.operator import s6_matrices, s6_matrices_direct
    g = torch.Generator().manual_seed(length)
    dt = torch.nn.functional.softplus(torch.randn(2, length, 3, generator=g, dtype=torch.float64))
    B = torch.randn(2, length, 4, generator=g, dtype=torch.float64)
    C = torch.randn(2, length, 4, generator=g, dtype=torch.float64)
    A = -torch.exp(torch.rand(3, 4, generator=g, dtype=torch.float64) * 2)
    assert_close(s6_matrices(dt, B, C, A, block=block), s6_matrices_direct(dt, B, C, A), 1e-12, "tiles")
