"""Hierarchical tiles (architectures/tiled.py): geometry, and the diagonal channel sums against dense loops."""

from __future__ import annotations

import pytest
import torch

from implicit_attention.architectures.base import channel_transform
from implicit_attention.architectures.tiled import DiagonalOperator, Tiling, assemble, diagonal_rows, diagonal_sum

from conftest import assert_close


def dense(op: DiagonalOperator) -> torch.Tensor:
    """``[B, E, L, L]`` the operator entry by entry from its equation (loops over ``i, j``)."""
    batch, length, channels = op.log_decay.shape
    width = op.width
    taps = op.taps if op.taps is not None else torch.ones(channels, 1, dtype=op.col.dtype)
    reset = op.reset if op.reset is not None else torch.zeros(batch, length, dtype=torch.bool)
    D = torch.zeros(batch, channels, length, length, dtype=op.col.dtype)
    for i in range(length):
        for j in range(i + 1):
            crossed = reset[:, j + 1:i + 1].any(dim=1)                               # [B]
            D[:, :, i, j] = torch.exp(op.log_decay[:, j + 1:i + 1].sum(dim=1)) * op.col[:, j] * ~crossed[:, None]
    A = torch.zeros_like(D)
    for j in range(length):
        for s in range(width):
            if j + s < length:
                A[..., j] += taps[:, width - 1 - s, None] * D[..., j + s]
    if op.key_mask is not None:
        A = A * op.key_mask[:, None, None, :]
    if op.row is not None:
        A = A * op.row.transpose(1, 2)[..., None]
    return A


def random_operator(batch=2, length=37, channels=3, width=3, *, rate=0.3, row=True, key_mask=True, resets=(),
                    dtype=torch.float64, seed=0) -> DiagonalOperator:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    log_decay = -rate * torch.rand(batch, length, channels, generator=g, dtype=dtype) * torch.logspace(
        -1, 1, channels, dtype=dtype)                                          # weak to strong channels
    reset = None
    if resets:
        reset = torch.zeros(batch, length, dtype=torch.bool)
        reset[-1, list(resets)] = True
    mask = None
    if key_mask:
        mask = torch.ones(batch, length, dtype=dtype)
        mask[-1, :2] = 0
    return DiagonalOperator(log_decay=log_decay, col=rand(batch, length, channels),
                            row=rand(batch, length, channels) if row else None,
                            taps=rand(channels, width) if width > 1 else None, key_mask=mask, reset=reset)


@pytest.mark.parametrize("length,block,width", [(1, 4, 1), (5, 4, 4), (16, 4, 1), (37, 4, 3), (64, 8, 4),
                                                (70, 16, 2), (33, 1, 1), (9, 2, 5)])
def test_tiles_cover_the_lower_triangle_once(length, block, width):
    tiling = Tiling(length, block, width)
    count = lambda shape: torch.ones(1, *shape[:-2], shape[-2], shape[-1])  # noqa: E731
    covered = assemble(tiling, 1, torch.float64, "cpu",
                       band=lambda w: torch.ones(1, w.count, w.size, w.size).tril(),
                       pair=lambda span, keys, rows, ref: count((rows.count, span, span)))
    assert torch.equal(covered[0], torch.ones(length, length, dtype=torch.float64).tril())


@pytest.mark.parametrize("width,row,key_mask", [(1, False, False), (3, True, True), (4, True, False)],
                         ids=["plain", "conv-row-mask", "conv4-row"])
@pytest.mark.parametrize("block", [None, 1, 4])
def test_channel_sum_equals_dense(width, row, key_mask, block):
    op = random_operator(width=width, row=row, key_mask=key_mask, seed=width)
    assert_close(diagonal_sum(op, block), dense(op).sum(1), 1e-12, "sum")


@pytest.mark.parametrize("resets", [(0,), (0, 5, 6, 20), (36,)])
def test_resets_factorise(resets):
    op = random_operator(width=3, resets=resets, seed=len(resets))
    reference = dense(op)
    assert_close(diagonal_sum(op, 4), reference.sum(1), 1e-12, "sum")
    rows = torch.tensor([0, 6, 21, 36])
    for how in ("mean", "abs", "pos"):
        assert_close(diagonal_rows(op, rows, how), channel_transform(reference[:, :, rows], how).sum(1), 1e-12, how)


def test_strong_decays_fall_back_to_exact_windows_and_zero_decays_cut():
    """Windows whose decay exceeds the factorisable range are computed entry by entry; a decay of
    exactly 0 (log = -inf) stops everything that crosses it without NaN."""
    op = random_operator(width=4, rate=200.0)
    assert_close(diagonal_sum(op, 8), dense(op).sum(1), 1e-12, "strong")
    op.log_decay[0, 10, 1] = float("-inf")
    reference = dense(op)
    fast = diagonal_sum(op, 4)
    assert torch.isfinite(fast).all()
    assert_close(fast, reference.sum(1), 1e-12, "zero decay")
    assert_close(diagonal_rows(op, torch.tensor([12, 36])), reference[:, :, [12, 36]].sum(1), 1e-12, "rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_equal_dense_rows(dtype):
    op = random_operator(width=3, dtype=dtype)
    reference = dense(op)
    rows = torch.tensor([0, 1, 17, 36])
    for how in ("mean", "abs", "pos"):
        expected = channel_transform(reference[:, :, rows], how).sum(1)
        assert_close(diagonal_rows(op, rows, how), expected, 1e-6 if dtype == torch.float32 else 1e-12, how)


def test_chunked_channels_agree():
    op = random_operator(channels=5, width=3)
    assert_close(diagonal_sum(op, 4, chunk_bytes=1), diagonal_sum(op, 4), 1e-13, "one channel per chunk")
    assert_close(diagonal_rows(op, torch.tensor([3, 30]), "abs", chunk_bytes=1),
                 diagonal_rows(op, torch.tensor([3, 30]), "abs"), 1e-13, "rows")
