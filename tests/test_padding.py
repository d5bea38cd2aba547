"""A text explained inside a padded batch gets the relevance it gets alone, for every method and class.

Models whose predictions depend on padding (they read padding tokens) refuse padded batches with a
PaddingError, and explain_texts runs their texts one at a time instead.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import implicit_attention as ia
from implicit_attention.architectures.registry import padding_leaks
from implicit_attention.explanations.lrp import supports_lrp
from implicit_attention.loading import LoadedModel
from test_attention import tiny as tiny_attention
from test_gla import tiny_gla
from test_griffin import tiny_griffin
from test_hgrn import tiny_hgrn
from test_hybrid_models import CONFIGS as HYBRIDS
from test_hybrid_models import tiny as tiny_hybrid
from test_mamba2 import tiny as tiny_mamba2
from test_retnet import tiny_retnet
from test_rwkv4 import tiny_rwkv
from test_rwkv6 import tiny_rwkv6
from test_rwkv7 import tiny_rwkv7
from test_xlstm import tiny_xlstm

from conftest import own_options, tiny_mamba

tf.logging.set_verbosity_error()

#: every method that reads the model (``random`` draws from the [B, L] grid, so it has nothing to keep)
METHODS = [m for m in ia.METHODS if m != "random"]
PAD = 2


def without_in_proj_bias(model):
    """As the released checkpoints of these families are: no bias in the mixers' in-projections."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(getattr(module, "in_proj", None), "bias", None)
            if bias is not None:
                bias.zero_()
    return model


#: classes whose real tokens ignore padding, built in float64
IGNORING = {
    "Mamba": lambda: tiny_mamba(dtype=torch.float64),
    "FalconMamba": lambda: tiny_mamba("FalconMambaForCausalLM", dtype=torch.float64),
    "Mamba2": lambda: without_in_proj_bias(tiny_mamba2("Mamba2ForCausalLM")),
    **{name: (lambda n: lambda: without_in_proj_bias(tiny_hybrid(n)))(name) for name in HYBRIDS},
    "GPT2": lambda: tiny_attention("GPT2LMHeadModel"),
    "Llama": lambda: tiny_attention("LlamaForCausalLM"),
    "RetNet": lambda: tiny_retnet(),
    "HGRN": lambda: tiny_hgrn(),
    "GLA": lambda: tiny_gla(),
    "RWKV6": lambda: tiny_rwkv6(),
    "RWKV7": lambda: tiny_rwkv7(),
}
#: classes that read padding tokens
READING = {
    "RWKV4": lambda: tiny_rwkv(dtype=torch.float64),
    "xLSTM": lambda: tiny_xlstm(dtype=torch.float64),
    "RecurrentGemma": lambda: tiny_griffin(dtype=torch.float64),
    "Mamba with an in_proj bias": lambda: tiny_mamba(dtype=torch.float64, use_bias=True),
    "Mamba2 with an in_proj bias": lambda: tiny_mamba2("Mamba2ForCausalLM"),
}


def batch(model, length: int = 7, seed: int = 0):
    """Two texts, the second left-padded by PAD tokens (ids 1 .. vocab-1)."""
    vocab = min(model.config.vocab_size, 40)
    ids = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :PAD] = 0
    ids[1, :PAD] = 0
    return ids, mask


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(IGNORING))
def test_padded_and_alone_agree(name):
    model = IGNORING[name]()
    assert not padding_leaks(model), name
    ids, mask = batch(model)
    with torch.no_grad():
        target = int(model(input_ids=ids[1:, PAD:]).logits[0, -1].argmax())
    for method in METHODS:
        if method == "lrp" and not supports_lrp(model):
            with pytest.raises(NotImplementedError, match="has rules for"):
                ia.explain(model, ids, mask, method=method)
            continue
        padded = ia.explain(model, ids, mask, method=method, target=target, **own_options(method, steps=4, samples=2))[1]
        alone = ia.explain(model, ids[1:, PAD:], method=method, target=target, **own_options(method, steps=4, samples=2))[0]
        assert torch.count_nonzero(alone) > 0, (name, method)
        assert relative(padded[PAD:], alone) <= 1e-5, (name, method, relative(padded[PAD:], alone))


def test_encoders_padded_on_the_right_agree():
    model = tiny_attention("BertForSequenceClassification")
    ids, mask = batch(model)
    ids, mask = ids.flip(1), mask.flip(1)                          # [CLS] first, padding at the end
    for method in METHODS:
        padded = ia.explain(model, ids, mask, method=method, target=1, **own_options(method, steps=4, samples=2))[1]
        alone = ia.explain(model, ids[1:, :-PAD], method=method, target=1, **own_options(method, steps=4, samples=2))[0]
        assert relative(padded[:-PAD], alone) <= 1e-5, (method, relative(padded[:-PAD], alone))


@pytest.mark.parametrize("name", list(READING))
def test_models_that_read_padding_refuse_padded_batches(name):
    model = READING[name]()
    assert padding_leaks(model), name
    ids, mask = batch(model)
    with torch.no_grad():   # the reason: the padded text's own prediction changes
        padded_logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[1, -1]
        alone_logits = model(input_ids=ids[1:, PAD:], use_cache=False).logits[0, -1]
    assert relative(padded_logits, alone_logits) > 1e-6
    for method in ("attribution", "grad_x_input"):
        with pytest.raises(ia.PaddingError, match="reads padding tokens.*one text at a time"):
            ia.explain(model, ids, mask, method=method)
    assert torch.isfinite(ia.explain(model, ids[:, PAD:], mask[:, PAD:])).all()     # no padding: fine
    ia.decompose(model, ids, mask)                                  # the decomposition stays exact


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from implicit_attention.bundled import bundled_model_path
    return AutoTokenizer.from_pretrained(bundled_model_path())


def test_explain_texts_runs_such_models_one_text_at_a_time(tokenizer):
    model = tiny_rwkv(dtype=torch.float64, vocab_size=len(tokenizer))
    loaded = LoadedModel(model=model, tokenizer=tokenizer)
    texts = ["a gorgeous, witty film", "dull"]
    result = ia.explain_texts(loaded, texts, method="rollout")
    assert len(result.runs) == 2 and all(run.attention_mask.all() for run in result.runs)
    for text, example in zip(texts, result):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        assert example.token_ids == ids[0].tolist()
        alone = ia.explain(model, ids, method="rollout", target=example.target.id)[0]
        assert torch.equal(example.relevance, alone)
    mamba = ia.explain_texts(LoadedModel(model=tiny_mamba(dtype=torch.float64, vocab_size=len(tokenizer)),
                                         tokenizer=tokenizer), texts, method="rollout")
    assert len(mamba.runs) == 1                                     # a model that ignores padding: one batch
