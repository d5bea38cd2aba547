"""Checks of the bundled ``rt-sentiment-mamba`` model (the zoo's Mamba, trained by scripts/train_zoo.py)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from implicit_attention.data import load_rotten_tomatoes  # noqa: E402

BUNDLED = Path(__file__).resolve().parent.parent / "src" / "implicit_attention" / "bundled" / "rt-sentiment-mamba"


@pytest.fixture(scope="module")
def task() -> dict:
    return json.loads((BUNDLED / "task.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(BUNDLED, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    m = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED, local_files_only=True, dtype=torch.float32)
    assert isinstance(m, transformers.MambaForCausalLM)
    return m.eval()


def test_files_present() -> None:
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "task.json"):
        assert (BUNDLED / name).is_file(), name
    size = sum(f.stat().st_size for f in BUNDLED.iterdir() if f.is_file())
    assert size < 8_000_000


def test_label_words_are_single_tokens(task: dict, tokenizer) -> None:
    for name, word in task["label_words"].items():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert ids == [task["label_token_ids"][name]], (word, ids)
        prompt = tokenizer(task["template"].format(text="a fine film"))["input_ids"]
        full = tokenizer(task["template"].format(text="a fine film") + word)["input_ids"]
        assert full == prompt + ids
    assert tokenizer(task["template"].format(text="x"))["input_ids"][0] == tokenizer.bos_token_id


def _label_scores(model, tokenizer, task: dict, texts: list[str]) -> torch.Tensor:
    """(n, 2) logits of [negative, positive] at the last prompt position."""
    pair = [task["label_token_ids"]["negative"], task["label_token_ids"]["positive"]]
    prompts = [task["template"].format(text=t) for t in texts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # right padding
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    last = batch["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(texts)), last][:, pair]


def test_predicts_label_words(model, tokenizer, task: dict) -> None:
    texts = [
        "a gorgeous, moving and beautifully acted film.",
        "a dull, lifeless and painfully unfunny mess.",
    ]
    label_ids = set(task["label_token_ids"].values())
    for text in texts:
        ids = tokenizer(task["template"].format(text=text), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top = model(input_ids=ids).logits[0, -1].topk(3).indices.tolist()
        assert top[0] in label_ids, (text, tokenizer.convert_ids_to_tokens(top))
    scores = _label_scores(model, tokenizer, task, texts)
    assert scores.argmax(-1).tolist() == [1, 0]


def test_accuracy_on_test_sentences(model, tokenizer, task: dict) -> None:
    data = load_rotten_tomatoes("test")[:200]
    texts = [text for text, _ in data]
    labels = torch.tensor([label for _, label in data])
    predictions = torch.cat(
        [_label_scores(model, tokenizer, task, texts[i : i + 50]).argmax(-1) for i in range(0, len(texts), 50)]
    )
    accuracy = (predictions == labels).float().mean().item()
    assert accuracy >= 0.65, accuracy


def test_stored_in_float16_and_loaded_in_float32(task: dict) -> None:
    """The checkpoint is float16 on disk; load_model runs it in float32; task.json counts its parameters."""
    from safetensors import safe_open

    from implicit_attention.loading import load_model

    with safe_open(str(BUNDLED / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F16"}
    loaded = load_model()
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in loaded.model.parameters()) == task["num_parameters"]


def test_temperature_scaling_finds_the_temperature_of_a_hand_made_case() -> None:
    from implicit_attention.benchmark.training import fit_temperature

    # one logit gap of 4 and 8 of 10 labels right: the best probability is 0.8 = sigmoid(4 / T)
    scores = torch.tensor([[0.0, 4.0]] * 10)
    labels = torch.tensor([1] * 8 + [0] * 2)
    assert fit_temperature(scores, labels) == pytest.approx(4 / math.log(4), rel=1e-6)


def test_the_bundled_model_shows_calibrated_probabilities(task: dict) -> None:
    """Its task.json records a temperature fitted on the validation split (scripts/calibrate.py), which
    lowers the test calibration error, and predictions use it (the argmax is unchanged)."""
    import implicit_attention as ia
    from implicit_attention.text import encode_text, predict_label

    calibration = task["calibration"]
    assert task["temperature"] > 1  # the model was overconfident
    assert calibration["test_before"]["ece"] == pytest.approx(task["test_ece"], abs=1e-4)
    assert calibration["test_after"]["ece"] < calibration["test_before"]["ece"] / 2
    loaded = ia.load_model()
    ids = torch.tensor([encode_text(loaded, "an utterly charming film").ids])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    word_ids = [loaded.label_ids[name] for name in loaded.labels]
    expected = (logits[0, -1, word_ids].double() / task["temperature"]).softmax(-1)
    prediction = predict_label(loaded, logits)[0]
    assert prediction.probabilities == pytest.approx(dict(zip(loaded.labels, expected.tolist())), rel=1e-9)
    assert prediction.label == loaded.labels[int(logits[0, -1, word_ids].argmax())]
