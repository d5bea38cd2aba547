"""Attribution of layers whose channels share one matrix per head (RetNet, GLA, MiniMax lightning, RWKV-6 and
RWKV-7 with its per-channel bonus on the diagonal): the per-head sign-split products against the generic
per-channel blocks, clamped and signed."""

from __future__ import annotations

import pytest

import implicit_attention as ia
from test_gla import tiny_gla
from test_lightning import VOCAB
from test_lightning import tiny as tiny_minimax
from test_retnet import tiny_retnet
from test_rwkv6 import tiny_rwkv6
from test_rwkv7 import tiny_rwkv7

from conftest import assert_attribution_matches_blocks, left_padded

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
