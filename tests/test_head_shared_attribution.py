"""Attribution of layers whose channels share one matrix per head (RetNet, GLA, MiniMax lightning, RWKV-6 and
RWKV-7 with its per-channel bonus on the diagonal): the per-head sign-split products against the generic
per-channel blocks, clamped and signed."""

from __future__ import annotations

import pytest
import torch

import implicit_attention as ia
from test_gla import tiny_gla
from test_lightning import VOCAB
from test_lightning import tiny as tiny_minimax
from test_retnet import tiny_retnet
from test_rwkv6 import tiny_rwkv6
from test_rwkv7 import tiny_rwkv7

from conftest import assert_attribution_matches_blocks, assert_close, left_padded

CASES = {
    "retnet": (lambda: tiny_retnet(), ("unified", "recurrence"), 40),
    "gla": (lambda: tiny_gla(), ("unified", "recurrence"), 40),
    "minimax": (lambda: tiny_minimax(), ("unified", "no_gate", "recurrence"), VOCAB),
    "rwkv6": (lambda: tiny_rwkv6(), ("unified", "wkv"), 40),
    "rwkv7": (lambda: tiny_rwkv7(), ("unified", "wkv"), 40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_head_shared_attribution_equals_the_channel_blocks(name):
    build, variants, vocab = CASES[name]
    model = build()
    ids, mask = left_padded(batch=2, length=9, vocab=vocab)
    for variant in variants:
        for layer in ia.decompose(model, ids, mask, variant=variant).layers:
            if type(layer).__name__ == "AttentionLayerDecomposition":
                continue                                  # a hybrid's softmax attention layer
            assert_attribution_matches_blocks(layer, f"{name} {variant}", fast_path=True)


@pytest.mark.parametrize("length", [5, 75])
def test_head_conv_reduce_equals_the_channels_formed_one_by_one(length):
    """A_c[i, j] = row_i[c] sum_s taps[c, K-1-s] M_h[i, j+s] col_{j+s}[c] for channels sharing their head's causal
    M_h, reduced as |.|, relu and the clamped / signed attribution: equal to each channel's matrix built on its
    own; at 75 tokens the causal row blocks (32 rows, each up to its last column) are three."""
    from implicit_attention.architectures.heads import head_conv_reduce

    generator = torch.Generator().manual_seed(length)
    batch, heads, head_size, width = 2, 2, 3, 4
    channels = heads * head_size
    M = torch.randn(batch, heads, length, length, dtype=torch.float64, generator=generator).tril()
    row, col, grad, values = (torch.randn(batch, length, channels, dtype=torch.float64, generator=generator)
                              for _ in range(4))
    taps = torch.randn(channels, width, dtype=torch.float64, generator=generator)
    per_channel = []
    for c in range(channels):
        T = M[:, c // head_size] * col[:, None, :, c]                              # [B, L, L]
        A = torch.zeros_like(T)
        for shift in range(width):
            A[..., : length - shift] += taps[c, width - 1 - shift] * T[..., shift:]
        per_channel.append(A * row[:, :, None, c])
    A = torch.stack(per_channel, dim=1)                                            # [B, C, L, L]
    cam = grad.transpose(1, 2)[..., None] * A * values.transpose(1, 2)[:, :, None, :]
    expected = {"abs": A.abs().mean(1), "pos": A.clamp(min=0).mean(1), "clamped": cam.clamp(min=0).mean(1),
                "signed": cam.mean(1)}
    head_matrix = lambda h: M[:, h: h + 1]  # noqa: E731
    for name, kwargs in (("abs", dict(how="abs")), ("pos", dict(how="pos")),
                         ("clamped", dict(grad=grad, values=values)),
                         ("signed", dict(grad=grad, values=values, signed=True))):
        got = head_conv_reduce(head_matrix, row, col, taps, head_size, block_bytes=1 << 20, **kwargs)
        assert_close(got, expected[name], 1e-12, name)
