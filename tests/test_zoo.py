"""The model zoo: every architecture builds, is size-matched, decomposes exactly, and trains end to end."""

from __future__ import annotations

import statistics

import pytest
import torch

import implicit_attention as ia
from implicit_attention.benchmark import training
from implicit_attention.benchmark.zoo import ZOO, ZOO_LAYERS, ZOO_WIDTH, build_model, non_embedding_count

VOCAB = 3072


@pytest.fixture(scope="module")
def zoo_models():
    return {name: build_model(name, VOCAB) for name in ZOO}


def test_the_zoo_is_size_matched(zoo_models):
    counts = {name: non_embedding_count(model) for name, model in zoo_models.items()}
    median = statistics.median(counts.values())
    for name, count in counts.items():
        assert 0.8 * median <= count <= 1.2 * median, (name, count, median)
    for name, model in zoo_models.items():
        assert model.get_input_embeddings().weight.shape == (VOCAB, ZOO_WIDTH), name
        # float16 checkpoints of at most 3 MB (2 bytes per parameter, tokenizer aside)
        assert sum(p.numel() for p in model.parameters()) * 2 < 2.9e6, name


def test_every_zoo_model_has_its_depth_and_an_exact_decomposition(zoo_models):
    ids = torch.randint(4, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    for name, model in zoo_models.items():
        model = model.double().eval()
        result = ia.decompose(model, ids)
        assert len(result.layers) >= ZOO_LAYERS - 1, name  # Griffin/Jamba: their attention layers count too
        worst = max(layer.error for layer in result.layers)
        assert worst < 1e-6, (name, worst)  # float64; Mamba-2's stock scan keeps some float32 steps
        model.float()


def test_a_zoo_model_pretrains_and_learns_a_prompted_task(tmp_path):
    """A tiny run of both stages: the LM loss falls and the saved float16 model reloads with its task.json."""
    from implicit_attention.loading import load_model

    sentences = [f"the {w} was {a} today" for w in ("film", "cast", "plot", "score") for a in ("fine", "dull")] * 8
    task = training.PromptTask(
        name="toy", template="{text} verdict:", label_names=("bad", "good"), label_words=(" bad", " good"),
        splits={"train": [(s, int("fine" in s)) for s in sentences],
                "validation": [(s, int("fine" in s)) for s in sentences[:16]],
                "test": [(s, int("fine" in s)) for s in sentences[:16]]})
    tokenizer = training.train_tokenizer(sentences, 300, extra_lines=task.prompt_lines())
    rows = training.pack_tokens(tokenizer, sentences, 16)
    pre = training.pretrain("gpt2", tokenizer, rows, tmp_path / "pre",
                            training.PretrainSettings(steps=60, batch_size=8, seq_len=16, warmup=5, lr=3e-3),
                            width=32, layers=2, log=lambda _: None)
    assert pre["validation_loss"] < 0.5 * torch.log(torch.tensor(float(len(tokenizer)))).item()
    result = training.train_task("gpt2", task, tmp_path / "pre", tmp_path / "toy",
                                 training.TaskSettings(epochs=30, batch_size=8, warmup=5, lr=3e-3, evals_per_epoch=1),
                                 log=lambda _: None)
    assert result["test_accuracy"] == 1.0
    loaded = load_model(tmp_path / "toy")
    assert loaded.labels == ["bad", "good"] and loaded.task["template"] == "{text} verdict:"
    assert next(loaded.model.parameters()).dtype == torch.float32
    # the shipped file is float16 and the reported accuracy is that of the reloaded copy
    from safetensors import safe_open
    with safe_open(str(tmp_path / "toy" / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"F16"}


def test_the_parallel_rwkv4_wkv_used_in_training_is_the_stock_token_loop():
    from transformers.models.rwkv import modeling_rwkv

    generator = torch.Generator().manual_seed(0)
    time_decay, time_first = torch.randn(6, generator=generator), torch.randn(6, generator=generator)
    key, value = torch.randn(2, 9, 6, generator=generator) * 3, torch.randn(2, 9, 6, generator=generator)
    expected, _ = modeling_rwkv.rwkv_linear_attention_cpu(time_decay, time_first, key, value)
    got, _ = training.parallel_rwkv4_wkv(time_decay, time_first, key, value)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    model = build_model("rwkv4", VOCAB, width=32, layers=2)
    ids = torch.randint(4, VOCAB, (2, 11), generator=generator)
    stock = model(ids, use_cache=False).logits
    training.enable_fast_training(model)
    try:
        fast = model(ids, use_cache=False).logits
    finally:
        training.disable_fast_training(model)
    assert modeling_rwkv.rwkv_linear_attention is not training.parallel_rwkv4_wkv
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-5)
