"""|A|, relu(A) and attribution of diagonal recurrences (RG-LRU, HGRN) against the generic per-channel blocks.

Without conv taps all three are sign-split factorised channel sums; with them |A| and relu(A) come from the
blocks, and the attribution from products off the band and per-channel entries in it (diagonal_sum with ProductWeights)."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from test_griffin import tiny_griffin
from test_hgrn import tiny_hgrn

from conftest import assert_attribution_matches_blocks, assert_close, left_padded


def diagonal_layers(model, ids, mask, variant):
    return [layer for layer in ia.decompose(model, ids, mask, variant=variant).layers
            if type(layer).__name__ in ("GriffinLayerDecomposition", "HGRNLayerDecomposition")]


@pytest.mark.parametrize("name,variant,split", [("griffin", "no_conv", True), ("griffin", "rglru", True),
                                                ("griffin", "unified", False), ("griffin", "no_gate", False),
                                                ("hgrn", "unified", False), ("hgrn", "recurrence", True),
                                                ("hgrn_without_conv", "unified", True)])
@pytest.mark.parametrize("length,tile_block", [(11, None), (70, 4)])
def test_sign_split_sums_equal_the_channel_blocks(name, variant, split, length, tile_block):
    """At 70 tokens with a band block of 4, three levels of tile pairs hold most entries."""
    model = (tiny_griffin(dtype=torch.float64) if name == "griffin"
             else tiny_hgrn(use_short_conv=name == "hgrn"))
    ids, mask = left_padded(batch=2, length=length, vocab=40)
    layers = diagonal_layers(model, ids, mask, variant)
    assert layers
    for layer in layers:
        layer.tile_block = tile_block
        grad = torch.randn(layer.output.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(layer.index))
        assert (layer._fast_abs_pos("abs") is not None) == split
        assert layer._fast_attribution(layer.matrix_gradient(grad)) is not None
        for how in ("abs", "pos"):
            assert_close(layer.aggregate(how), layer.aggregate_by_blocks(how), 1e-12, f"{name} {variant} {how}")
        assert_attribution_matches_blocks(layer, f"{name} {variant}", fast_path=True)
