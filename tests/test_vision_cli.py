"""``implicit-attention explain-image`` on a tiny random ViT saved to a temporary directory: any image
size and mode, a folder with a progress bar, the report with its overlays, and the missing model."""

from __future__ import annotations

import base64
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from implicit_attention import bundled
from implicit_attention.cli import main
from implicit_attention.vision.classifiers import build_classifier
from implicit_attention.vision.composites import CLASSES
from implicit_attention.vision.images import Preprocessing, image_files, overlay_png

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit")
    build_classifier("vit", image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=16).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5],
                                                               "image_std": [0.25, 0.25, 0.25]}))
    return path


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 50, 4), dtype=np.uint8), "RGBA").save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 20), dtype=np.uint8), "L").save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_preprocessing_converts_and_resizes_any_image(vit_dir, images):
    model = build_classifier("vit", image_size=16, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=8)
    prep = Preprocessing.for_model(model, vit_dir)
    assert (prep.size, prep.channels, prep.mean, prep.std) == ((16, 16), 3, (0.5,) * 3, (0.25,) * 3)
    grey = Image.new("L", (7, 9), 255)
    pixels = prep(grey)
    assert pixels.shape == (3, 16, 16) and torch.allclose(pixels, torch.full_like(pixels, 2.0))   # (1 - .5) / .25
    assert Preprocessing(size=(8, 12), channels=1)(Image.new("RGB", (3, 3), (255, 0, 0))).shape == (1, 8, 12)
    assert [p.name for p in image_files(images)] == ["a.png", "b.jpg"] and len(image_files(images, 1)) == 1


def test_overlay_keeps_the_image_under_the_heat(tmp_path):
    image = Image.new("L", (20, 10), 0)
    path = overlay_png(image, torch.zeros(4, 4), tmp_path / "o.png", min_side=50)
    drawn = np.asarray(Image.open(path))
    assert drawn.shape == (50, 100, 3)                                            # enlarged 5 times
    assert tuple(drawn[0, 0]) == tuple(np.rint(0.45 * np.array([0, 0, 0.5]) * 255).astype(int))  # jet(0), dark blue


def test_explain_image_writes_the_report_for_a_folder(vit_dir, images, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["explain-image", str(images), "--model", str(vit_dir), "--out", str(out), "--progress"]) == 0
    printed = capsys.readouterr()
    assert "a.png:" in printed.out and "b.jpg:" in printed.out and "most relevant patches" in printed.out
    assert "max reconstruction error" in printed.out and "image/s" in printed.err           # the progress bar
    info = json.loads((out / "explanation.json").read_text())
    assert len(info["examples"]) == 2 and info["layers"] and info["max_error"] < 1e-4
    example = info["examples"][0]
    assert len(example["tokens"]) == 17 and example["tokens"][:2] == ["[CLS]", "p(0,0)"]
    assert example["in_span"][0] is False and example["prediction"]["kind"] == "label"
    assert [p["file"] for p in example["pictures"]] == ["overlay_0_a.png"]
    assert (out / "overlay_1_b.png").is_file() and (out / "matrix_ex1_layer1_abs.png").is_file()
    # the page carries the overlay itself (one file that travels alone), byte for byte the PNG beside it
    encoded = base64.b64encode((out / "overlay_0_a.png").read_bytes()).decode("ascii")
    assert f'src="data:image/png;base64,{encoded}"' in (out / "report.html").read_text()


def test_explain_image_with_a_target_and_a_baseline(vit_dir, images, capsys):
    assert main(["explain-image", str(images / "b.jpg"), "--model", str(vit_dir), "--method", "grad_x_input",
                 "--target", "Bag"]) == 0
    assert "explaining 'Bag' (class 8)" in capsys.readouterr().out
    assert main(["explain-image", str(images / "b.jpg"), "--model", str(vit_dir), "--target", "Hat"]) == 2
    assert "neither a class index" in capsys.readouterr().err


def test_without_a_model_the_bundled_vim_explains_the_saved_composites(capsys):
    """The bundled ViM (86% on generated test composites) classifies far above
    chance (10%), the folder's masks are not explained as images, and the decomposition reconstructs every layer."""
    folder = REPO_ROOT / "data" / "fashion-composites" / "test"
    labels = {row["file"]: CLASSES[int(row["label"])] for row in csv.DictReader(open(folder / "index.csv"))}
    assert main(["explain-image", str(folder), "--limit", "24", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model: fashion-vim (bundled) (VimForImageClassification" in out
    predicted = dict(re.findall(r"^\S*/(\d+\.png): (.+?) \(p=", out, flags=re.M))
    assert len(predicted) == 24 and all(not name.endswith("_mask.png") for name in predicted)
    accuracy = sum(predicted[name] == labels[name] for name in predicted) / len(predicted)
    assert accuracy > 0.65, accuracy
    error = float(re.search(r"max reconstruction error: ([0-9.e+-]+)", out).group(1))
    assert error < 1e-4


def test_a_missing_bundled_image_model_is_a_clear_error(images, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bundled, "bundled_image_model_path", lambda name="fashion-vim": tmp_path / name)
    assert main(["explain-image", str(images)]) == 2
    err = capsys.readouterr().err
    assert "bundled image model 'fashion-vim' is missing" in err and "--model DIR" in err
    assert main(["explain-image", str(images / "missing.png"), "--model", str(tmp_path)]) == 2
    assert "neither an image file nor a folder" in capsys.readouterr().err


def test_the_bundled_deit_explains_by_name(capsys):
    """--model fashion-deit: the bundled DeiT (85% on generated test composites), its attention decomposed."""
    folder = REPO_ROOT / "data" / "fashion-composites" / "test"
    labels = {row["file"]: CLASSES[int(row["label"])] for row in csv.DictReader(open(folder / "index.csv"))}
    assert main(["explain-image", str(folder), "--limit", "12", "--model", "fashion-deit", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "model: fashion-deit (bundled) (DeiTForImageClassification" in out
    predicted = dict(re.findall(r"^\S*/(\d+\.png): (.+?) \(p=", out, flags=re.M))
    assert len(predicted) == 12
    assert sum(predicted[name] == labels[name] for name in predicted) / len(predicted) > 0.65
    with pytest.raises(ValueError, match="the bundled ones are fashion-vim, fashion-deit"):
        bundled.bundled_image_model_path("fashion-vit")
    # a name that is neither a folder nor a bundled model, or a missing folder: said at once, no Hub attempt
    for model in ("fashion-vit", "./no-such-model"):
        assert main(["explain-image", str(folder / "00000.png"), "--model", model]) == 2
        err = capsys.readouterr().err
        assert "no such directory and not a bundled image model" in err and "fashion-deit" in err


def test_a_folder_lists_images_without_the_composites_masks(tmp_path):
    for name in ("a.png", "a_mask.png", "b_mask.png", "c.jpg"):
        Image.fromarray(np.zeros((4, 4), dtype=np.uint8), "L").save(tmp_path / name)
    # a_mask.png is a's mask; b_mask.png has no b.png beside it, so it is an image of its own
    assert [p.name for p in image_files(tmp_path)] == ["a.png", "b_mask.png", "c.jpg"]
