"""Explanation rules on cases small enough to compute by hand."""

from __future__ import annotations

import torch

from implicit_attention.architectures.base import LayerDecomposition
from implicit_attention.explanations.rules import (
    attribution_rollout,
    mask_map,
    minmax,
    normalize_rows,
    paper_layer_map,
    paper_rollout,
    rollout,
)

D = torch.float64


def t(rows):
    return torch.tensor(rows, dtype=D)


def test_normalize_rows_keeps_zero_rows():
    assert torch.equal(normalize_rows(t([[1, 3], [0, 0]])), t([[0.25, 0.75], [0, 0]]))


def test_minmax_ignores_padding():
    x = t([[5, 1, 3, 2]])
    mask = t([[0, 1, 1, 1]])
    assert torch.allclose(minmax(x, mask), t([[0, 0, 1, 0.5]]))


def test_rollout_two_layers_by_hand():
    A1 = t([[[0, 0], [1, 1]]])          # I + A1 = [[1, 0], [1, 2]] -> [[1, 0], [1/3, 2/3]]
    A2 = t([[[1, 0], [0, 2]]])          # I + A2 = [[2, 0], [0, 3]] -> identity
    R = rollout([A1, A2])
    assert torch.allclose(R[0], t([[1, 0], [1 / 3, 2 / 3]]))
    A3 = t([[[0, 0], [2, 0]]])          # I + A3 = [[1, 0], [2, 1]] -> [[1, 0], [2/3, 1/3]]
    R = rollout([A1, A3])               # = [[1,0],[2/3,1/3]] @ [[1,0],[1/3,2/3]]
    assert torch.allclose(R[0], t([[1, 0], [2 / 3 + 1 / 9, 2 / 9]]))


def test_attribution_rollout_by_hand():
    cam = t([[[0, 0], [1, 0]]])
    R = attribution_rollout([cam, cam])  # R1 = [[1,0],[1,1]]; R2 = R1 + cam R1 = [[1,0],[2,1]]
    assert torch.equal(R[0], t([[1, 0], [2, 1]]))


def test_paper_rollout_by_hand():
    A = t([[[1.0, 0.0], [0.5, 0.5]]])   # a layer's mean relu(A)
    s = t([[1.0, 0.5]])                 # saliency, scaling the columns
    mask = t([[1, 1]])
    # E = A diag(s) = [[1, 0], [0.5, 0.25]], min-max over the matrix keeps it; I + E = [[2, 0], [0.5, 1.25]]
    # -> rows [[1, 0], [2/7, 5/7]]
    assert torch.allclose(paper_layer_map(A, s, mask), t([[[1, 0], [0.5, 0.25]]]))
    assert torch.allclose(paper_rollout([A], [s], mask, row=1), t([[2 / 7, 5 / 7]]))
    # two layers: row 1 of N @ N = [2/7 + (5/7)(2/7), (5/7)^2] = [24/49, 25/49]
    assert torch.allclose(paper_rollout([A, A], [s, s], mask, row=1), t([[24 / 49, 25 / 49]]))
    # min-max over the whole matrix: [[2, 1], [0, 3]] -> [[2/3, 1/3], [0, 1]]
    B = t([[[2.0, 1.0], [0.0, 3.0]]])
    assert torch.allclose(paper_layer_map(B, t([[1.0, 1.0]]), mask), t([[[2 / 3, 1 / 3], [0, 1]]]))


def test_padding_rows_and_columns_change_nothing():
    """A left-padded copy of a 2-token example gets its relevance, whatever the maps hold on padding."""
    A = t([[[1.0, 0.0], [0.5, 0.5]]])
    s = t([[1.0, 0.5]])
    padded = t([[[9.0, 9.0, 9.0], [7.0, 1.0, 0.0], [3.0, 0.5, 0.5]]])   # row/column 0 is padding
    mask = t([[0, 1, 1]])
    expected = paper_rollout([A, A], [s, s], t([[1, 1]]), row=1)
    got = paper_rollout([padded, padded], [t([[5.0, 1.0, 0.5]])] * 2, mask, row=2)
    assert torch.allclose(got[:, 1:], expected) and got[0, 0] == 0
    assert torch.allclose(rollout([mask_map(padded, mask)])[:, 2, 1:], rollout([A])[:, 1])


class FixedLayer(LayerDecomposition):
    """A layer with a given matrix, for checking the generic aggregates by hand."""

    def __init__(self, matrix, values, offset):
        self.fixed = matrix
        super().__init__(index=0, name="fixed", variant="unified", exact=True, values=values, offset=offset,
                         output=torch.einsum("bcij,bjc->bic", matrix, values) + offset,
                         mask=torch.ones(values.shape[:2], dtype=values.dtype))

    def _block(self, channels):
        return self.fixed[:, channels], None


def fixed_layer():
    # two channels, two tokens
    A = t([[[[1, 0], [-2, 3]], [[-1, 0], [4, 1]]]])       # [B=1, C=2, L=2, L=2]
    v = t([[[1, 2], [3, -1]]])                           # [B=1, L=2, C=2]
    return FixedLayer(A, v, torch.zeros_like(v))


def test_aggregates_by_hand():
    layer = fixed_layer()
    assert torch.equal(layer.aggregate("mean")[0], t([[0, 0], [1, 2]]))
    assert torch.equal(layer.aggregate("abs")[0], t([[1, 0], [3, 2]]))
    assert torch.equal(layer.aggregate("pos")[0], t([[0.5, 0], [2, 2]]))
    assert torch.equal(layer.aggregate(channel=1)[0], t([[-1, 0], [4, 1]]))
    assert torch.equal(layer.matrix, layer.fixed)
    layer.measure_error()
    assert layer.error == 0


def test_attribution_cam_by_hand():
    layer = fixed_layer()
    g = t([[[1, -1], [2, 1]]])                           # gradient [B, L, C]
    # channel 0: g_i A_ij v_j = [[1*1*1, 0], [2*-2*1, 2*3*3]] = [[1, 0], [-4, 18]] -> relu [[1,0],[0,18]]
    # channel 1: g = [-1, 1], v = [2, -1]: [[-1*-1*2, 0], [1*4*2, 1*1*-1]] = [[2, 0], [8, -1]] -> [[2,0],[8,0]]
    assert torch.equal(layer.attribution(g)[0], t([[1.5, 0], [4, 9]]))
