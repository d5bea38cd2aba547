"""Fast Mamba aggregates (factorised signed mean, single rows) against the direct computation."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from implicit_attention.architectures.mamba import mamba_factors
from implicit_attention.architectures.mamba.fast import (
    ChannelReduction,
    channel_reduced,
    exact_channel_mean,
    matrix_rows,
    signed_mean,
)
from implicit_attention.architectures.mamba.operator import VARIANTS, mamba_block
from implicit_attention.hooks import capture, select_layers

from conftest import assert_close, left_padded, tiny_mamba


def factors_of(model, ids, mask, layer=-1, dtype=torch.float64):
    targets = select_layers(model, [layer])
    with torch.no_grad(), capture(model, targets) as captured:
        model(input_ids=ids, attention_mask=mask)
    r = captured[0]
    return mamba_factors(r.module, r.inputs, r.attention_mask, dtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_kernel", [2, 4, 5])
@pytest.mark.parametrize("tiles", [(1,), (3,), (8, 2), (64, 8), (12, 4, 1)])
def test_factorised_mean_equals_direct_mean(variant, conv_kernel, tiles):
    model = tiny_mamba(dtype=torch.float64, conv_kernel=conv_kernel, seed=conv_kernel)
    ids, mask = left_padded(batch=2, length=21 if tiles[0] < 64 else 90, seed=tiles[0])
    f = factors_of(model, ids, mask)
    assert_close(signed_mean(f, variant, tile_sizes=tiles), exact_channel_mean(f, variant), 1e-12, variant)


@pytest.mark.parametrize("length", [8, 32, 33, 64, 70])
def test_hierarchy_edges(length):
    """Lengths at and around powers of two of the block, where the last tiles are cropped."""
    model = tiny_mamba(dtype=torch.float64, conv_kernel=4)
    ids = torch.randint(1, 40, (1, length), generator=torch.Generator().manual_seed(length))
    f = factors_of(model, ids, None)
    assert_close(signed_mean(f, "unified", tile_sizes=(16, 4)), exact_channel_mean(f, "unified"), 1e-12,
                 str(length))


def test_huge_steps_stay_exact():
    """Steps far beyond exp's range: every exponent of the tiles and the band stays <= 0."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=40)
    f = factors_of(model, ids, mask)
    f.dt = f.dt * 500
    assert_close(signed_mean(f, "unified", tile_sizes=(16, 4)), exact_channel_mean(f, "unified"), 1e-12, "huge")


def test_tile_sizes_must_nest():
    model = tiny_mamba(dtype=torch.float64)
    f = factors_of(model, *left_padded(batch=1, length=10))
    with pytest.raises(ValueError, match="multiple"):
        signed_mean(f, "unified", tile_sizes=(8, 3))


@pytest.mark.parametrize("variant", VARIANTS)
def test_rows_equal_full_matrix_rows(variant):
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=11)
    f = factors_of(model, ids, mask)
    full, _ = mamba_block(f, slice(0, f.x.shape[-1]), variant)                 # [B, E, L, L]
    rows = torch.tensor([0, 4, 10])
    assert_close(matrix_rows(f, variant, rows), full[:, :, rows].transpose(1, 2), 1e-12, variant)


@pytest.mark.parametrize("how", ["mean", "abs", "pos"])
def test_layer_aggregate_rows_match_generic(how):
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=9)
    layer = ia.decompose(model, ids, mask).layers[0]
    generic = layer.rows_by_blocks([-1, 2], how)            # block-based
    assert_close(layer.aggregate_rows([-1, 2], how), generic, 1e-12, how)
    direct = torch.stack([(b if how == "mean" else b.abs() if how == "abs" else b.clamp(min=0))
                          for b in [layer.matrix]])[0].mean(1)
    assert_close(layer.aggregate(how), direct, 1e-12, how)


def test_float32_fast_mean_is_stable_on_long_inputs():
    """L = 768 with large steps: float32 factorised mean vs float64 direct mean."""
    model = tiny_mamba(dtype=torch.float64, hidden_size=8, state_size=4)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.dt_proj.bias.add_(2.0)        # dt ~ 2: cumulative sums reach ~1500
    ids = torch.randint(1, 40, (1, 768), generator=torch.Generator().manual_seed(0))
    f64 = factors_of(model, ids, None)
    f32 = factors_of(model, ids, None, dtype=torch.float32)
    assert float(f64.dt.sum(1).max()) > 1000
    reference = exact_channel_mean(f64, "unified")
    fast = signed_mean(f32, "unified")
    assert torch.isfinite(fast).all()
    assert_close(fast.double(), reference, 1e-5, "float32 fast mean, L=768")


def test_sampled_exactness_check_on_long_inputs():
    from implicit_attention.architectures import base
    model = tiny_mamba(dtype=torch.float64, hidden_size=40)      # 80 channels
    ids = torch.randint(1, 40, (1, 90))                          # long enough that rows cost less
    layer = ia.decompose(model, ids).layers[0]
    full_error = layer.error
    assert layer.error_channels == 80 and layer.error_rows is None
    sampled = layer.measure_error(max_entries=100)                   # Mamba reads rows: every channel, 8 rows
    assert layer.error_channels == 80 and layer.error_rows == base.SAMPLED_ROWS
    assert sampled <= 1e-6 and full_error <= 1e-6
    layer._row_outputs = lambda rows: None                            # without fast rows: sampled channels
    by_channels = layer.measure_error(max_entries=100)
    assert layer.error_channels == base.SAMPLED_CHANNELS and layer.error_rows is None and by_channels <= 1e-6
    # a wide layer on a short input: 8 rows of 80 channels cost more than 32 channels of 20 tokens
    short = ia.decompose(model, ids[:, :20]).layers[0]
    short.measure_error(max_entries=100)
    assert short.error_channels == base.SAMPLED_CHANNELS and short.error_rows is None
    assert base._sample_groups(24, 8) == [slice(0, 2), slice(7, 9), slice(15, 17), slice(22, 24)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_row_check_reads_the_offset_and_catches_a_wrong_operator(variant):
    """The rows of every channel's matrix and of the conv-bias offset equal the blocks' rows, so the row check
    reconstructs the module exactly; a wrong conv bias (the offset alone) is caught by it."""
    from implicit_attention.architectures.mamba.fast import matrix_and_offset_rows

    model = tiny_mamba(dtype=torch.float64, hidden_size=16)
    ids, mask = left_padded(batch=2, length=40)
    layer = ia.decompose(model, ids, mask, variant=variant).layers[1]
    rows = torch.tensor([0, 7, 39])
    matrices, offset = matrix_and_offset_rows(layer.factors, variant, rows)
    block, block_offset = mamba_block(layer.factors, slice(0, layer.channels), variant)
    assert_close(matrices, block[:, :, rows].transpose(1, 2), 1e-13, "matrix rows")
    assert (offset is None) == (block_offset is None)
    if offset is None:
        return
    assert_close(offset, block_offset[:, rows], 1e-13, "offset rows")
    if layer.exact:
        assert layer.measure_error(max_entries=0) < 1e-8 and layer.error_rows == 8     # as the full check
    layer.factors.conv_bias = layer.factors.conv_bias + 0.5
    assert layer.measure_error(max_entries=0) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_kernel", [2, 4])
def test_row_outputs_equal_the_rows_contracted_with_the_values(variant, conv_kernel):
    """The check's O(L E N) recurrence between sampled rows (taps moved onto the values, the offset joined to
    them, the state carried from row to row) against the explicit rows times the values plus the offset."""
    from implicit_attention.architectures.mamba.fast import matrix_and_offset_rows, row_outputs

    model = tiny_mamba(dtype=torch.float64, hidden_size=16, conv_kernel=conv_kernel, seed=conv_kernel)
    ids, mask = left_padded(batch=2, length=40)
    layer = ia.decompose(model, ids, mask, variant=variant).layers[1]
    for rows in (torch.tensor([0, 1, 7, 23, 39]), torch.tensor([12]), torch.arange(40)):
        matrices, offset = matrix_and_offset_rows(layer.factors, variant, rows)
        expected = torch.einsum("brcl,blc->brc", matrices, layer.values)
        expected = expected if offset is None else expected + offset
        for chunk_bytes in (None, 1):                                   # one chunk per segment; one column a chunk
            assert_close(row_outputs(layer.factors, variant, rows, layer.values, chunk_bytes=chunk_bytes), expected,
                         1e-12, f"{variant} {rows[:3]} {chunk_bytes}")
    with pytest.raises(ValueError, match="ascending"):
        row_outputs(layer.factors, variant, torch.tensor([7, 3]), layer.values)


def test_float32_fast_mean_is_stable_at_16k_tokens():
    """L = 16384, float32 fast map vs float64 exact rows (matrix_rows in float64) on sampled rows."""
    model = tiny_mamba(dtype=torch.float64, hidden_size=4, state_size=4, num_hidden_layers=1)
    ids = torch.randint(1, 40, (1, 16384), generator=torch.Generator().manual_seed(1))
    f64 = factors_of(model, ids, None)
    f32 = factors_of(model, ids, None, dtype=torch.float32)
    assert float(f64.dt.sum(1).max()) > 1000                      # cumulative steps far past exp's range
    fast = signed_mean(f32, "unified")
    rows = torch.tensor([5, 4095, 9000, 16383])
    reference = matrix_rows(f64, "unified", rows).mean(dim=2)      # [B, R, L] exact, float64
    assert torch.isfinite(fast).all()
    assert_close(fast[:, rows].double(), reference, 1e-5, "float32 fast mean, L=16384")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("conv_kernel", [2, 4])
@pytest.mark.parametrize("length,tiles", [(9, (1,)), (33, (3,)), (40, (16, 4)), (70, (32, 4)), (90, (64, 8))])
def test_channel_reductions_equal_the_blocks(variant, conv_kernel, length, tiles):
    """Mean of |A| and relu(A), and the attribution (clamped and signed), formed tile by tile per channel,
    against the materialised channel blocks transformed entry by entry."""
    model = tiny_mamba(dtype=torch.float64, conv_kernel=conv_kernel, seed=conv_kernel)
    ids, mask = left_padded(batch=2, length=length, seed=length)
    f = factors_of(model, ids, mask)
    block, _ = mamba_block(f, slice(0, f.x.shape[-1]), variant)                       # [B, E, L, L]
    for how, transform in (("abs", torch.abs), ("pos", lambda a: a.clamp(min=0))):
        expected = transform(block).mean(1)
        assert_close(channel_reduced(f, variant, ChannelReduction(how), tile_sizes=tiles), expected, 1e-12, how)
    generator = torch.Generator().manual_seed(length)
    grad, values = (torch.randn(f.x.shape, dtype=torch.float64, generator=generator) for _ in range(2))
    cam = grad.transpose(1, 2)[..., None] * block * values.transpose(1, 2)[..., None, :]
    for signed in (False, True):
        expected = (cam if signed else cam.clamp(min=0)).mean(1)
        reduction = ChannelReduction(grad=grad, values=values, signed=signed)
        assert_close(channel_reduced(f, variant, reduction, tile_sizes=tiles), expected, 1e-12, f"signed={signed}")


def test_channel_reductions_with_huge_steps():
    """Steps far beyond exp's range: every exponent of the per-channel tiles stays <= 0."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=40)
    f = factors_of(model, ids, mask)
    f.dt = f.dt * 500
    block, _ = mamba_block(f, slice(0, f.x.shape[-1]), "unified")
    assert_close(channel_reduced(f, "unified", ChannelReduction("abs"), tile_sizes=(16, 4)), block.abs().mean(1),
                 1e-12, "huge")


@pytest.mark.parametrize("variant", ["unified", "s6", "no_gate"])
def test_layer_serves_abs_pos_and_attribution_without_blocks(variant):
    """The layer's aggregate('abs'|'pos') and attribution take the tile path and equal the generic blocks."""
    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=37)
    layer = ia.decompose(model, ids, attention_mask=mask, variant=variant, layers=[-1])[0]
    for how in ("abs", "pos"):
        assert layer._fast_aggregate(how) is not None
        assert_close(layer.aggregate(how), layer.aggregate_by_blocks(how), 1e-12, how)
    grad = torch.randn(layer.output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for signed in (False, True):
        expected = layer.attribution_by_blocks(layer.matrix_gradient(grad), signed)
        assert_close(layer.attribution(grad, signed), expected, 1e-12, f"signed={signed}")


def test_a_fused_output_projection_is_checked_and_differentiated_through():
    """A layer captured after its output projection (``projection``): the check reconstructs the module's
    output through it, and the attribution of a gradient at that output equals the attribution of the
    gradient carried back to the operator's output."""
    from implicit_attention.architectures.mamba.layer import MambaLayerDecomposition

    model = tiny_mamba(dtype=torch.float64)
    ids, mask = left_padded(batch=2, length=19)
    layer = ia.decompose(model, ids, attention_mask=mask, layers=[-1])[0]
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(7, layer.channels, dtype=torch.float64, generator=generator)
    projected = MambaLayerDecomposition(layer.factors, variant="unified", index=0, name="projected",
                                        output=layer.output @ weight.T, projection=weight)
    assert layer.error < 1e-8 and projected.measure_error() < 1e-8      # the module's own float64 rounding
    wrong = MambaLayerDecomposition(layer.factors, variant="unified", index=0, name="wrong",
                                    output=layer.output @ weight.T, projection=weight.flip(0))
    assert wrong.measure_error() > 1e-2
    grad = torch.randn(*layer.output.shape[:2], 7, dtype=torch.float64, generator=generator)
    for signed in (False, True):
        assert_close(projected.attribution(grad, signed), layer.attribution(grad @ weight, signed), 1e-12, "cam")
    with pytest.raises(ValueError, match="grad must have shape"):
        projected.attribution(grad @ weight)


def test_channel_reductions_fall_back_to_the_eager_tiles_when_the_fused_kernel_fails(monkeypatch):
    """Where the fused kernel is picked by default but cannot run (a Triton that fails to compile it), the eager
    tiles serve with a warning, once; asked for explicitly (fused=True) the error is raised."""
    from implicit_attention.architectures.mamba import fast, triton

    model = tiny_mamba(dtype=torch.float32)
    ids, mask = left_padded(batch=2, length=21)
    f = factors_of(model, ids, mask, dtype=torch.float32)
    expected = fast.channel_reduced(f, "unified", fast.ChannelReduction("abs"), fused=False)

    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton, "available", lambda tensor: True)
    monkeypatch.setattr(triton, "reduced_tiles_fused", broken)
    monkeypatch.setattr(fast._warn_fused_fallback, "said", False, raising=False)
    with pytest.warns(RuntimeWarning, match="PassManager::run failed"):
        got = fast.channel_reduced(f, "unified", fast.ChannelReduction("abs"))
    assert torch.equal(got, expected)
    with pytest.raises(RuntimeError, match="PassManager"):
        fast.channel_reduced(f, "unified", fast.ChannelReduction("abs"), fused=True)


@pytest.mark.parametrize("variant", ["unified", "s6", "no_act"])
def test_band_entries_of_every_offset_at_once_equal_each_offset(variant):
    """The band near the diagonal formed for all offsets in one product equals it offset by offset, with
    zeros where the key would precede the first token (inputs shorter than the band included)."""
    from implicit_attention.architectures.mamba.fast import _back_windows, _band_entries, _band_offset, variant_parts

    model = tiny_mamba(dtype=torch.float64, hidden_size=8)
    for length in (5, 23):
        ids, mask = left_padded(batch=2, length=length, seed=length)
        f = factors_of(model, ids, mask)
        _, col, _, use_D = variant_parts(f, variant)
        key = f.dt if col is None else f.dt * col
        cums = f.dt.to(torch.float64).cumsum(dim=1)
        offsets, ch = 11, slice(3, 12)
        together = _band_entries(f, cums, ch, offsets, f.C[:, :, None] * _back_windows(f.B, offsets), key, col, use_D)
        for offset in range(offsets):
            expected = torch.zeros(2, length, 9, dtype=torch.float64)
            if offset < length:
                expected[:, offset:] = _band_offset(f, cums, ch, offset, key, col, use_D)
            assert_close(together[:, :, offset], expected, 1e-13, f"{variant} L={length} offset {offset}")
