"""Rough edges found by trying the command line and the API as a new user would (issue 14): each gets a
clear, one-line error or a quiet exit instead of a traceback from deep inside torch, autograd or captum."""

from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import implicit_attention as ia  # noqa: E402

from conftest import tiny_mamba  # noqa: E402

IDS = torch.tensor([[1, 2, 3, 4, 5], [3, 4, 5, 6, 7]])


@pytest.fixture(scope="module")
def model():
    return tiny_mamba()


# ------------------------------------------------------------------------------------------ 1: layers=[]
def test_empty_layer_list_is_refused_by_explain_and_decompose(model) -> None:
    message = re.escape("layers=[] selects no layer: pass layers=None for every token-mixing layer, or at least "
                        "one index (the model has 2)")
    with pytest.raises(ValueError, match=message):
        ia.explain(model, IDS, layers=[])
    with pytest.raises(ValueError, match=message):
        ia.decompose(model, IDS, layers=[])


# ------------------------------------------------------------------------------------ 2, 4: the target
def test_text_target_says_to_pass_a_token_id(model) -> None:
    for method in ("attribution", "grad_x_input"):
        with pytest.raises(ValueError, match=r"^target ' positive' is text, but explain\(\) takes token ids: "
                                             r"pass the token's id .*explain_texts or the command line"):
            ia.explain(model, IDS, target=" positive", method=method)


@pytest.mark.parametrize("target", [10.7, 10.0, True, [1.5, 2.0], torch.tensor(3.0)])
def test_non_integer_target_is_refused(model, target) -> None:
    with pytest.raises(ValueError, match=r"^target must be integer token ids, got .*a token id is an int$"):
        ia.explain(model, IDS, target=target)


@pytest.mark.parametrize("target", [[10], [10, 11, 12], torch.tensor([10])])
def test_target_list_must_hold_one_id_per_example(model, target) -> None:
    n = len(target)
    with pytest.raises(ValueError, match=rf"^target holds {n} id\(s\) for a batch of 2: give one int \(for every "
                                         r"example\) or exactly one id per example$"):
        ia.explain(model, IDS, target=target)


def test_single_int_target_still_applies_to_every_example(model) -> None:
    one = ia.run_explanation(model, IDS, target=10)
    each = ia.run_explanation(model, IDS, target=[10, 10])
    assert one.target.ids.tolist() == [10, 10]
    torch.testing.assert_close(one.relevance, each.relevance)
    assert ia.run_explanation(model, IDS, target=torch.tensor(10)).target.ids.tolist() == [10, 10]
    assert ia.run_explanation(model, IDS[:1], target=[10]).target.ids.tolist() == [10]


def test_zero_integration_steps_are_refused(model) -> None:
    with pytest.raises(ValueError, match=r"^option steps must be an integer >= 1, got 0$"):
        ia.explain(model, IDS, method="integrated_gradients", steps=0)


# ------------------------------------------------------------------------------ 3: out-of-vocabulary ids
@pytest.mark.parametrize("bad", [40, 99, -1])
def test_out_of_vocabulary_id_names_the_id_and_the_vocabulary(model, bad) -> None:
    ids = torch.tensor([[1, 2, 3], [4, bad, 5]])
    message = (rf"^token id {bad} \(row 1, position 1\) is outside the model's vocabulary of 40 ids: "
               r"ids must lie in \[0, 40\)$")
    for call in (lambda: ia.explain(model, ids), lambda: ia.decompose(model, ids),
                 lambda: ia.explain(model, ids, method="grad_x_input")):
        with pytest.raises(ValueError, match=message):
            call()


# ================================================================================= the command line
BUNDLED = pytest.mark.skipif(not (__import__("implicit_attention.bundled", fromlist=["x"]).bundled_model_path()
                                  / "model.safetensors").is_file(), reason="bundled model not present")


def run(capsys, *argv) -> tuple[int, str, str]:
    from implicit_attention import cli

    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def no_work(*args, **kwargs):  # pragma: no cover - the refusals come before any model is loaded
    raise AssertionError("the command did work before refusing")


@pytest.fixture
def refuse_work(monkeypatch):
    """Fail the test if a command loads a model or starts a data set run."""
    from implicit_attention import dataset, loading

    monkeypatch.setattr(loading, "load_model", no_work)
    monkeypatch.setattr(dataset, "run_dataset", no_work)


# --------------------------------------------------------------------------- 10, 11: usage and help
def test_usage_errors_are_one_line(capsys) -> None:
    code, out, err = run(capsys, "explain", "good", "--bogus")
    assert (code, out) == (2, "")
    assert err.splitlines() == ["error: unrecognized arguments: --bogus (see 'implicit-attention --help')"]
    code, _, err = run(capsys, "explain-dataset", "data.txt")
    assert code == 2 and err.splitlines() == [
        "error: the following arguments are required: --out (see 'implicit-attention explain-dataset --help')"]
    code, _, err = run(capsys, "explain", "x", "--method", "nope")
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: argument --method: invalid choice")


def test_top_level_help_names_the_architecture_families() -> None:
    from implicit_attention.cli import build_parser

    text = " ".join(build_parser().format_help().split())
    for family in ("Mamba, Mamba-2", "RWKV", "Griffin", "xLSTM", "RetNet", "hybrids", "Transformers"):
        assert family in text


# ------------------------------------------------------------------------ 5: baselines' matrix options
def test_baselines_refuse_layers_and_variant(capsys, refuse_work, tmp_path) -> None:
    code, out, err = run(capsys, "explain", "good film", "--method", "random", "--layers", "0", "--variant", "no_gate")
    assert (code, out) == (2, "")
    assert err == ("error: --layers and --variant do not apply to the random baseline without --out (with it they "
                   "pick the report's matrices): it decomposes no layer; leave them out\n")
    code, _, err = run(capsys, "explain", "good film", "--method", "lrp", "--variant", "s6")
    assert code == 2 and err.startswith("error: --variant does not apply to the lrp baseline without --out")
    data = tmp_path / "d.txt"
    data.write_text("good film\n")
    code, _, err = run(capsys, "explain-dataset", data, "--out", tmp_path / "o", "--method", "occlusion",
                       "--layers=-1")
    assert code == 2 and err == ("error: --layers does not apply to the occlusion baseline: it decomposes no layer; "
                                 "leave it out\n")
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------- 6: --out checked up front
def test_unwritable_out_is_refused_before_any_work(capsys, refuse_work, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = tmp_path / "d.txt"
    data.write_text("good film\n")
    expected = f"error: --out '{blocker}/out' cannot be created: '{blocker}' is a file, not a directory\n"
    code, out, err = run(capsys, "explain", "good film", "--out", blocker / "out")
    assert (code, out, err) == (2, "", expected)
    code, out, err = run(capsys, "explain-dataset", data, "--out", blocker / "out")
    assert (code, out, err) == (2, "", expected)


# ----------------------------------------------------------------------- 7: empty and ragged input files
@pytest.mark.parametrize("name, content, why", [
    ("e.txt", "", "the file is empty"), ("e.jsonl", "", "the file is empty"), ("e.csv", "", "the file is empty"),
    ("h.csv", "text,label\n", "the file has a header row but no data rows")])
def test_empty_data_set_is_an_error(capsys, refuse_work, tmp_path, name, content, why) -> None:
    from implicit_attention.dataset import DatasetError, read_inputs

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: no inputs: {why}$"):
        read_inputs(path)


@BUNDLED
def test_empty_data_set_exits_2_and_writes_nothing(capsys, tmp_path) -> None:
    path = tmp_path / "e.txt"
    path.write_text("")
    code, out, err = run(capsys, "explain-dataset", path, "--out", tmp_path / "o", "--no-progress")
    assert (code, out, err) == (2, "", f"error: {path}: no inputs: the file is empty\n")
    assert not (tmp_path / "o").exists()


def test_ragged_csv_rows_name_their_line(tmp_path) -> None:
    from implicit_attention.dataset import DatasetError, read_inputs

    path = tmp_path / "r.csv"
    path.write_text('text,label\n"fine, quoted",1\ngood,0\nbad,0,extra\n')
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(path))}, line 4: 3 field\(s\), but the header has 2 "
                                           r"\(quote a text that holds the delimiter\)$"):
        read_inputs(path, label_key="label")
    path.write_text("text\tlabel\tid\ngood\t1\t7\nshort\t0\n")
    with pytest.raises(DatasetError, match=r", line 3: 2 field\(s\), but the header has 3 "):
        read_inputs(path, fmt="tsv")
    assert [r.text for r in read_inputs(path, fmt="tsv", limit=1)] == ["good"]  # rows past the limit: unread


# ------------------------------------------------------------------------------------ 8: the lock file
def test_lock_file_is_removed_when_the_run_ends(tmp_path) -> None:
    from implicit_attention.dataset import LOCK_FILE, run_lock

    with run_lock(tmp_path):
        assert (tmp_path / LOCK_FILE).is_file()
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RuntimeError, match="boom"), run_lock(tmp_path):
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@BUNDLED
def test_explain_dataset_leaves_no_lock_file(capsys, tmp_path) -> None:
    data = tmp_path / "d.txt"
    data.write_text("good film\n")
    code, _, _ = run(capsys, "explain-dataset", data, "--out", tmp_path / "o", "--method", "random", "--no-progress")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["index.html", "reports", "results.jsonl",
                                                                  "run.json", "summary.json"]


# ------------------------------------------------------------------------------------- 9: broken pipe
@BUNDLED
def test_closed_pipe_exits_quietly() -> None:
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "implicit_attention", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader has gone, as `| head` does after its lines
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Error" not in err and "error" not in err and "Traceback" not in err, err


# --------------------------------------------------------------------- 12: the gate under attribution
@BUNDLED
def test_info_and_variant_help_say_the_gate_cancels_under_attribution(capsys) -> None:
    from implicit_attention.cli import GATE_CANCELS, build_parser

    sentence = ("under --method attribution an output-side factor such as the gate cancels (no_gate attribution "
                "equals unified by construction: the gradient at the matrix output carries the gate back), so the "
                "ablations that change attribution are the value-side ones")
    assert GATE_CANCELS == sentence
    code, out, _ = run(capsys, "info")
    assert code == 0 and f"note: {sentence}" in out.splitlines()
    explain = build_parser()._subparsers._group_actions[0].choices["explain"]
    assert sentence in " ".join(explain.format_help().split())


def test_no_gate_attribution_equals_unified(model) -> None:
    a = ia.explain(model, IDS, variant="unified", check=False)
    b = ia.explain(model, IDS, variant="no_gate", check=False)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- 13: half-precision models
@BUNDLED
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_explain_offers_half_precision(capsys, dtype) -> None:
    code, out, err = run(capsys, "explain", "an utterly charming film", "--dtype", dtype)
    assert code == 0, err
    assert f"(MambaForCausalLM, {dtype})" in out and "prediction: positive" in out
    assert "max reconstruction error: " in out
