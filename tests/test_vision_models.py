"""ViT, DeiT (eager attention) and our ViM as image classifiers: built, saved in float16, loaded, and
explained on pixel inputs by every matrix method; the training script's tiny run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import implicit_attention as ia
from implicit_attention.architectures import find_layers
from implicit_attention.inputs import prepare_model_inputs
from implicit_attention.vision.classifiers import build_classifier, load_classifier, vim_available
from implicit_attention.vision.composites import CompositeFolder, fashion_mnist_available, normalize
from implicit_attention.vision.evaluation import patch_grid

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=16, num_hidden_layers=2)
KINDS = ["vit", "deit"] + (["vim"] if vim_available() else [])


def tiny(kind: str, dtype=torch.float64):
    extra = dict(num_attention_heads=2, intermediate_size=16) if kind != "vim" else dict(state_size=4)
    return build_classifier(kind, **TINY, **extra).to(dtype)


def composites(count: int = 2) -> torch.Tensor:
    folder = CompositeFolder(ROOT / "data" / "fashion-composites" / "test", length=count)
    return normalize(torch.stack([folder[i][0] for i in range(count)]))


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_layers_are_found_and_decomposed_exactly(kind):
    model = tiny(kind)
    assert len(find_layers(model)) == 2
    pixels = composites().double()
    inputs = prepare_model_inputs(model, pixels)
    assert inputs.name == "pixel_values" and len(inputs.patch_positions) == 64 and patch_grid(model) == (8, 8)
    assert inputs.length == 64 + {"vit": 1, "deit": 2, "vim": 1}[kind]
    result = ia.decompose(model, pixels)
    assert max(result.errors) <= 1e-6, result.errors


@pytest.mark.parametrize("method", ["raw", "rollout", "attribution", "paper", "grad_x_input"])
@pytest.mark.parametrize("kind", ["vit", "deit"])
def test_attention_methods_explain_pixels_from_the_class_token(kind, method):
    model = tiny(kind)
    pixels = composites().double()
    expl = ia.run_explanation(model, pixels, method=method)
    inputs = prepare_model_inputs(model, pixels)
    assert expl.relevance.shape == (2, inputs.length) and expl.target.row == inputs.class_token == 0
    patches = expl.relevance[:, inputs.patch_positions]
    assert torch.isfinite(expl.relevance).all() and bool((patches != 0).any(dim=1).all())
    # each image alone gets the relevance it gets in the batch
    alone = ia.explain(model, pixels[1:], method=method, target=int(expl.target.ids[1]))
    assert torch.allclose(alone[0], expl.relevance[1], atol=1e-9 * float(expl.relevance.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_float16_checkpoint_round_trip(kind, tmp_path):
    model = tiny(kind, torch.float32)
    model.half().save_pretrained(tmp_path)
    loaded = load_classifier(tmp_path)
    assert type(loaded) is type(model) and next(loaded.parameters()).dtype == torch.float32
    assert loaded.config.num_labels == 10 and loaded.config.id2label[8] == "Bag"
    if kind != "vim":
        assert loaded.config._attn_implementation == "eager"
    pixels = composites(1)
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=pixels).logits, model.float()(pixel_values=pixels).logits)


@pytest.mark.skipif(not fashion_mnist_available(), reason="needs the Debian package dataset-fashion-mnist "
                    "(apt-get install -y dataset-fashion-mnist): the training script generates train composites")
def test_train_script_tiny_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_vision", ROOT / "scripts" / "train_vision.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    argv = ["--models", "vit", "--steps", "3", "--batch-size", "4", "--limit", "8", "--workers", "0",
            "--out", str(tmp_path)]
    try:
        assert script.main(argv) == 0
        record = json.loads((tmp_path / "vit" / "train.json").read_text())
        assert record["steps_done"] == 3 and record["test_accuracy"]["n"] == 8 and len(record["history"]) == 1
        assert record["checkpoint_bytes"] <= 3_000_000 and "hardware" in record
        assert not (tmp_path / "vit" / "state.pt").exists()
        assert isinstance(load_classifier(tmp_path / "vit"), torch.nn.Module)
        assert script.main(argv) == 0 and "done already" in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)
