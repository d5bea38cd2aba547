"""``implicit-attention explain-dataset``: formats, accuracy, resume, sharding and torchrun (gloo, CPU).

Runs on the bundled sentiment model with six short sentences; one thread per process keeps the
timings steady on a busy two-core machine.
"""

from __future__ import annotations

import importlib.util
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

from implicit_attention import cli, dataset  # noqa: E402
from implicit_attention.bundled import bundled_model_path  # noqa: E402
from implicit_attention.dataset import (  # noqa: E402
    DatasetError,
    DatasetOptions,
    Distributed,
    InputRecord,
    parse_label_map,
    read_inputs,
    read_results,
    run_dataset,
    runner,  # noqa: E402  (explain_batch and load_for_run's importlib live there)
    shard_path,
)

pytestmark = pytest.mark.skipif(not (bundled_model_path() / "model.safetensors").is_file(),
                                reason="bundled model not present")

# (text, gold): index 2 is empty in every file (skipped and counted)
ROWS = [("an utterly charming and moving film", "1"), ("a dull, lifeless mess", "0"), ("", "1"),
        ("great acting and a witty script", "1"), ("the plot is boring and the jokes fall flat", "0"),
        ("it is not a good movie", "1"), ("a gorgeous film", "1")]
RT = {"1": "fresh", "0": "rotten"}
TOL = 1e-6
FINAL_FILES = ["index.html", "results.jsonl", "run.json", "summary.json"]  # the lock file is removed at the end


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    txt = root / "reviews.txt"
    txt.write_text("".join(text + "\n" for text, _ in ROWS[:-1]) + ROWS[-1][0])  # no final newline
    csv_file = root / "reviews.csv"
    csv_file.write_text("id,text,label\n" + "".join(f'{i},"{t}",{g}\n' for i, (t, g) in enumerate(ROWS)))
    jsonl = root / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"review": t, "category": RT[g]}) + "\n" for t, g in ROWS))
    return {"txt": txt, "csv": csv_file, "jsonl": jsonl}


def run(capsys, *argv) -> tuple[int, str, str]:
    """``implicit-attention ARGV``; an ``explain-dataset`` run writes no per-input reports unless it asks
    (``--reports``): they cost most of a small run's time, and the torchrun test checks them."""
    argv = [str(a) for a in argv]
    if argv[:1] == ["explain-dataset"] and "--reports" not in argv and "--help" not in argv:
        argv += ["--reports", "0"]
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def load(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


def assert_same(rows: list[dict], expected: list[dict]) -> None:
    """Same inputs, tokens and predictions; relevance within TOL (batches may be composed differently)."""
    assert [r["index"] for r in rows] == [r["index"] for r in expected]
    for a, b in zip(rows, expected):
        assert (a["text"], a["tokens"], a["prediction"], a["target"], a["gold"]) == \
               (b["text"], b["tokens"], b["prediction"], b["target"], b["gold"])
        assert max(abs(x - y) for x, y in zip(a["relevance"], b["relevance"])) <= TOL
        assert abs(a["probability"] - b["probability"]) <= TOL


@pytest.fixture(scope="module")
def clean(files, tmp_path_factory) -> tuple[list[dict], dict]:
    """A clean single-process run over the CSV (batch size 2)."""
    out = tmp_path_factory.mktemp("clean") / "run"
    code = cli.main(["explain-dataset", str(files["csv"]), "--label-column", "label", "--out", str(out),
                     "--batch-size", "2", "--no-progress", "--reports", "0"])
    assert code == 0
    return load(out)


# ------------------------------------------------------------------------------ formats, summary
def test_csv_results_and_accuracy(clean) -> None:
    rows, summary = clean
    non_empty = [i for i, (t, _) in enumerate(ROWS) if t]
    assert [r["index"] for r in rows] == non_empty
    names = {"1": "positive", "0": "negative"}
    for row in rows:
        text, gold = ROWS[row["index"]]
        assert row["text"] == text
        assert len(row["relevance"]) == len(row["tokens"]) > len(text.split())
        assert all(r is not None and math.isfinite(r) for r in row["relevance"])
        assert row["tokens"][0] == "<s>" and "".join(row["tokens"][1:]).strip().startswith(text.split()[0])
        assert row["gold_raw"] == gold and row["gold"] == names[gold]
        assert row["correct"] == (row["prediction"] == names[gold])
        assert row["prediction"] == max(row["probabilities"], key=row["probabilities"].get)
        assert row["target"]["label"] == row["prediction"]  # default target: the prediction
        assert 0 < row["batch_max_error"] < 1e-4
    counts = summary["counts"]
    assert counts["inputs"] == len(ROWS) and counts["empty_skipped"] == 1
    assert counts["explained"] == counts["explained_this_run"] == counts["labelled"] == len(non_empty)
    correct = sum(row["prediction"] == names[ROWS[row["index"]][1]] for row in rows)
    assert counts["correct"] == correct and summary["accuracy"] == pytest.approx(correct / len(rows))
    errors = [row["batch_max_error"] for row in rows]
    assert summary["reconstruction_error"]["max"] == max(errors)
    assert summary["reconstruction_error"]["mean"] == pytest.approx(sum(errors) / len(errors))
    assert summary["complete"] and summary["processes"] == 1 and summary["examples_per_second"] > 0
    assert (summary["method"], summary["variant"], summary["format"]) == ("attribution", "unified", "csv")


def test_text_and_jsonl_match_csv(capsys, files, clean, tmp_path: Path) -> None:
    code, stdout, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "txt", "--batch-size", "2",
                            "--no-progress")
    assert code == 0, err
    rows, summary = load(tmp_path / "txt")
    assert summary["accuracy"] is None and summary["counts"]["labelled"] == 0 and "explained: 6 of 7" in stdout
    assert_same([dict(r, gold=None) for r in clean[0]], rows)

    # fresh/rotten are not task labels: a clear error, then the documented mapping
    jsonl = ["explain-dataset", files["jsonl"], "--text-field", "review", "--label-field", "category",
             "--batch-size", "2", "--no-progress"]
    code, _, err = run(capsys, *jsonl, "--out", tmp_path / "bad")
    assert code == 2 and err.startswith("error: gold labels 'fresh'") and "--label-map" in err
    assert not (tmp_path / "bad").exists()
    code, _, err = run(capsys, *jsonl, "--out", tmp_path / "jsonl", "--label-map", "fresh=positive,rotten=negative")
    assert code == 0, err
    rows, summary = load(tmp_path / "jsonl")
    assert_same(rows, clean[0])
    assert summary["accuracy"] == clean[1]["accuracy"] and summary["format"] == "jsonl"


def test_fixed_target_and_limit(capsys, files, tmp_path: Path) -> None:
    code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--target", "negative",
                       "--limit", "3", "--method", "rollout", "--layers=-1", "--no-progress")
    assert code == 0, err
    rows, summary = load(tmp_path / "o")
    assert [r["index"] for r in rows] == [0, 1] and summary["counts"]["inputs"] == 3
    assert all(r["target"]["label"] == "negative" for r in rows)
    assert summary["method"] == "rollout" and summary["layers"] == [-1]


# -------------------------------------------------------------------------------------- resume
def test_resume_after_limit(capsys, files, clean, tmp_path: Path) -> None:
    args = ["explain-dataset", files["csv"], "--label-column", "label", "--out", tmp_path / "o", "--no-progress"]
    code, _, err = run(capsys, *args, "--limit", "4", "--batch-size", "2")
    assert code == 0, err
    assert [r["index"] for r in load(tmp_path / "o")[0]] == [0, 1, 3]
    code, stdout, err = run(capsys, *args, "--batch-size", "3")  # batch size may change on resume
    assert code == 0, err
    rows, summary = load(tmp_path / "o")
    assert_same(rows, clean[0])
    assert summary["counts"]["explained_this_run"] == 3 and "3 in this run" in stdout
    assert summary["accuracy"] == clean[1]["accuracy"]
    # a finished run run again explains nothing and rewrites the same results
    before = (tmp_path / "o" / "results.jsonl").read_bytes()
    assert run(capsys, *args)[0] == 0
    assert (tmp_path / "o" / "results.jsonl").read_bytes() == before


def test_resume_after_crash(capsys, monkeypatch, files, clean, tmp_path: Path) -> None:
    out = tmp_path / "o"
    real, calls = runner.explain_batch, []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "explain_batch", crash_on_second)
    args = ["explain-dataset", files["csv"], "--label-column", "label", "--out", out, "--batch-size", "2",
            "--no-progress"]
    code, _, err = run(capsys, *args)
    assert code == 130 and "interrupted" in err
    shard = shard_path(out, 0)
    # the first batch of two: the two shortest texts of the length window (it spans the whole file)
    tokenizer = runner.load_for_run(DatasetOptions(path=files["csv"], out=tmp_path / "unused"), "cpu").tokenizer
    by_length = sorted((len(tokenizer(text, add_special_tokens=False)["input_ids"]), i)
                       for i, (text, _) in enumerate(ROWS) if text)
    assert by_length[1][0] < by_length[2][0]  # the two shortest are unambiguous
    assert sorted(r["index"] for r in read_results(shard)) == sorted(i for _, i in by_length[:2])
    assert not (out / "summary.json").exists()
    # a kill in the middle of the next write leaves a partial line behind
    with open(shard, "a") as handle:
        handle.write('{"index": 3, "text": "great acting and a wi')
    monkeypatch.setattr(runner, "explain_batch", real)
    code, _, err = run(capsys, *args)
    assert code == 0, err
    rows, summary = load(out)
    assert_same(rows, clean[0])
    assert summary["counts"]["explained_this_run"] == 4 and not shard.exists()


def test_length_sorted_batches_hand_case() -> None:
    items = list("abcdefg")
    lengths = [5, 1, 4, 2, 6, 3, 1]
    # windows of 2 batches of 2: a-d sorted (b d c a), then e-g (g f e); ties keep the file's order
    assert runner.length_sorted_batches(items, lengths, 2, 2) == [["b", "d"], ["c", "a"], ["g", "f"], ["e"]]
    assert runner.length_sorted_batches(items, lengths, 3, 1) == [["b", "c", "a"], ["d", "f", "e"], ["g"]]
    assert runner.length_sorted_batches(items, [1] * 7, 2, 8) == [["a", "b"], ["c", "d"], ["e", "f"], ["g"]]
    with pytest.raises(ValueError, match="at least 1"):
        runner.length_sorted_batches(items, lengths, 2, 0)
    with pytest.raises(ValueError, match="7 inputs but 6 lengths"):
        runner.length_sorted_batches(items, lengths[:6], 2, 2)


def test_length_window_batches_similar_texts(capsys, monkeypatch, files, clean, tmp_path: Path) -> None:
    """Sorted within the window, the batches' token counts never decrease; window 1 keeps the file order;
    both give the clean run's results, stored by index."""
    real, batches = runner.explain_batch, []

    def record(loaded, batch, *args, **kwargs):
        batches.append([(r.index, len(loaded.tokenizer(r.text, add_special_tokens=False)["input_ids"]))
                        for r in batch])
        return real(loaded, batch, *args, **kwargs)

    monkeypatch.setattr(runner, "explain_batch", record)
    base = ["explain-dataset", files["csv"], "--label-column", "label", "--batch-size", "2", "--no-progress"]
    assert run(capsys, *base, "--out", tmp_path / "sorted")[0] == 0
    lengths = [n for batch in batches for _, n in batch]
    assert lengths == sorted(lengths) and len(set(lengths)) > 2
    assert [i for batch in batches for i, _ in batch] != [0, 1, 3, 4, 5, 6]
    assert_same(load(tmp_path / "sorted")[0], clean[0])
    assert load(tmp_path / "sorted")[1]["length_window"] == 8
    batches.clear()
    assert run(capsys, *base, "--out", tmp_path / "file-order", "--length-window", "1")[0] == 0
    assert [[i for i, _ in batch] for batch in batches] == [[0, 1], [3, 4], [5, 6]]
    assert_same(load(tmp_path / "file-order")[0], clean[0])
    code, _, err = run(capsys, *base, "--out", tmp_path / "bad", "--length-window", "0")
    assert code == 2 and "--length-window must be at least 1" in err and not (tmp_path / "bad").exists()


def test_batches_that_do_not_fit_are_halved(capsys, monkeypatch, files, clean, tmp_path: Path) -> None:
    """A batch above the memory budget is halved and retried, and later batches are cut to what fitted;
    a single input that does not fit stops the run with the budget's message."""
    from implicit_attention.errors import MemoryBudgetError

    real, sizes = runner.explain_batch, []

    def budget_of_two(loaded, batch, *args, **kwargs):
        sizes.append(len(batch))
        if len(batch) > 2:
            raise MemoryBudgetError(f"a batch of {len(batch)}", len(batch) << 30, 2 << 30, "Try fewer.")
        return real(loaded, batch, *args, **kwargs)

    monkeypatch.setattr(runner, "explain_batch", budget_of_two)
    base = ["explain-dataset", files["csv"], "--label-column", "label", "--no-progress", "--length-window", "1"]
    code, _, err = run(capsys, *base, "--out", tmp_path / "o", "--batch-size", "4")
    assert code == 0, err
    # the command prints the warning as one line
    assert "warning: explain-dataset: a batch of 4 texts did not fit in memory (a batch of 4 needs about 4.0 GiB " \
           "but only 2.0 GiB is available. Try fewer.); continuing with batches of 2" in err
    # 0 1 3 4 fails, then 0 1 | 3 4, and the last batch (5 6) is cut to 2 before it is tried
    assert sizes == [4, 2, 2, 2]
    rows, summary = load(tmp_path / "o")
    assert_same(rows, clean[0])
    assert summary["batch_size"] == 4 and summary["batch_size_reduced_to"] == 2

    def budget_of_zero(loaded, batch, *args, **kwargs):
        raise MemoryBudgetError("one text", 1 << 30, 0, "Try a shorter text.")

    monkeypatch.setattr(runner, "explain_batch", budget_of_zero)
    code, _, err = run(capsys, *base, "--out", tmp_path / "none", "--batch-size", "2")
    assert code == 2 and "continuing with batches of 1" in err and err.strip().endswith("Try a shorter text.")


def test_refuse_other_settings(capsys, files, tmp_path: Path) -> None:
    out = tmp_path / "o"
    base = ["explain-dataset", files["txt"], "--out", out, "--limit", "2", "--no-progress"]
    assert run(capsys, *base)[0] == 0
    code, _, err = run(capsys, *base, "--method", "rollout")
    assert code == 2 and "other settings" in err and "--method: 'attribution' there, 'rollout' now" in err
    code, _, err = run(capsys, *base, "--dtype", "float64")
    assert code == 2 and "dtype" in err and "--force" in err
    code, _, err = run(capsys, *base, "--method", "rollout", "--force")
    assert code == 0, err
    rows, summary = load(out)
    assert summary["method"] == "rollout" and summary["counts"]["explained_this_run"] == 2 and len(rows) == 2
    # a second run on the same directory while one is going: refused
    with dataset.run_lock(out):
        code, _, err = run(capsys, *base, "--method", "rollout")
    assert code == 2 and "another explain-dataset run is writing to" in err
    # the same arguments on a changed file: refused
    changed = tmp_path / "changed.txt"
    changed.write_text(files["txt"].read_text().replace("gorgeous", "ugly"))
    code, _, err = run(capsys, "explain-dataset", changed, "--out", out, "--limit", "2", "--method", "rollout")
    assert code == 2 and "input file's contents changed" in err


# ------------------------------------------------------------------ sharding without torchrun
def test_shards_merge_like_one_process(files, clean, tmp_path: Path) -> None:
    """Two ranks one after the other (no-op barriers); rank 0 again at the end merges everything."""
    options = DatasetOptions(path=files["csv"], out=tmp_path / "o", label_key="label", batch_size=2, progress=False)
    first = run_dataset(options, Distributed(rank=0, world_size=2))  # rank 0 takes 0, 4, 6 of 0, 1, 3, 4, 5, 6
    assert not first["complete"] and first["counts"]["remaining"] == 3
    assert [r["index"] for r in read_results(Path(options.out) / "results.jsonl")] == [0, 4, 6]
    assert run_dataset(options, Distributed(rank=1, world_size=2)) is None
    assert sorted(r["index"] for r in read_results(shard_path(options.out, 1))) == [1, 3, 5]  # in batch order
    summary = run_dataset(options, Distributed(rank=0, world_size=2))  # merges rank 1's shard, nothing left
    assert summary["complete"] and summary["processes"] == 2
    assert sorted(p.name for p in Path(options.out).iterdir()) == FINAL_FILES
    assert_same(load(Path(options.out))[0], clean[0])


def test_readers_and_label_map(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.tsv"
    path.write_text("text\tlabel\nfine\t1.0\n\t0\n")
    assert read_inputs(path, label_key="label") == [InputRecord(0, "fine", "1.0"), InputRecord(1, "", "0")]
    assert parse_label_map(["fresh=positive, rotten=negative"]) == {"fresh": "positive", "rotten": "negative"}
    with pytest.raises(DatasetError, match="GOLD=LABEL"):
        parse_label_map("fresh")
    for name, content, message in (("a.json", "{}", "--format"), ("b.csv", "review\nx\n", "no text column 'text'"),
                                   ("c.jsonl", '{"text": "a"}\n[1]\n', "line 2: expected a JSON object")):
        (tmp_path / name).write_text(content)
        code, _, err = run(capsys, "explain-dataset", tmp_path / name, "--out", tmp_path / "o")
        assert code == 2 and message in err, err
    code, _, err = run(capsys, "explain-dataset", path, "--out", tmp_path / "o", "--label-column", "label",
                       "--label-map", "1=great")
    assert code == 2 and "'great' is not a label of the task" in err


def test_help_and_device_map(capsys, monkeypatch, files, tmp_path: Path) -> None:
    code, stdout, _ = run(capsys, "explain-dataset", "--help")
    assert code == 0
    for option in ("--out", "--format", "--text-column", "--label-column", "--text-field", "--label-field",
                   "--label-map", "--limit", "--batch-size", "--device-map", "--force", "torchrun", "resume"):
        assert option in stdout, option
    assert "explain-dataset" in run(capsys, "--help")[1]

    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else real_spec(name, *a))
    code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--device-map", "auto")
    assert code == 2 and "needs the accelerate package" in err

    # with accelerate "installed", load_model's from_pretrained receives device_map="auto"
    from transformers import MambaForCausalLM  # the class the bundled checkpoint declares
    seen, real_load = [], MambaForCausalLM.from_pretrained
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "accelerate" else real_spec(name, *a))
    monkeypatch.setattr(MambaForCausalLM, "from_pretrained",
                        lambda *a, device_map=None, **k: seen.append(device_map) or real_load(*a, **k))
    code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--device-map", "auto",
                       "--limit", "1", "--no-progress")
    assert code == 0, err
    assert seen == ["auto"]
    assert load(tmp_path / "o")[1]["device"] == "device_map=auto"
    code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--device-map", "auto",
                       "--device", "cpu")
    assert code == 2 and "exclude each other" in err
    # an explicit map from a JSON file reaches from_pretrained as a dict; bad values are refused clearly
    placement = {"backbone": "cpu", "lm_head": "cpu"}
    (tmp_path / "map.json").write_text(json.dumps(placement))
    code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--device-map",
                       tmp_path / "map.json", "--limit", "2", "--no-progress")
    assert code == 0, err
    assert seen[-1] == placement
    (tmp_path / "bad.json").write_text('["cuda:0"]')
    for value, message in (("everywhere", "neither one of auto, balanced"), (tmp_path / "bad.json", "JSON object")):
        code, _, err = run(capsys, "explain-dataset", files["txt"], "--out", tmp_path / "o", "--device-map", value)
        assert code == 2 and message in err, err
    assert dataset.resolve_device_map("balanced") == "balanced"


def test_device_map_runs_matrix_methods_through_accelerate(capsys, monkeypatch, files, clean, tmp_path: Path) -> None:
    """--device-map with accelerate's hooks on every block (one mixer split from its block, as a layer on
    another GPU would be): attribution (gradients through the hooks) and rollout as without it."""
    accelerate = pytest.importorskip("accelerate")
    from transformers import MambaForCausalLM  # the class the bundled checkpoint declares
    real_load = MambaForCausalLM.from_pretrained
    # every block whole but the last, whose norm and mixer are placed apart (a map must cover every weight)
    last = json.loads((bundled_model_path() / "config.json").read_text())["num_hidden_layers"] - 1
    split = {"backbone.embeddings": "cpu", **{f"backbone.layers.{i}": "cpu" for i in range(last)},
             f"backbone.layers.{last}.norm": "cpu", f"backbone.layers.{last}.mixer": "cpu",
             "backbone.norm_f": "cpu", "lm_head": "cpu"}

    def dispatched(*args, device_map=None, **kwargs):
        assert device_map == "auto"
        model, info = real_load(*args, **kwargs)            # load_model asks for the loading info
        return accelerate.dispatch_model(model, device_map=split, main_device="cpu", force_hooks=True), info

    monkeypatch.setattr(MambaForCausalLM, "from_pretrained", dispatched)
    out = tmp_path / "split"
    code, _, err = run(capsys, "explain-dataset", files["csv"], "--label-column", "label", "--out", out,
                       "--device-map", "auto", "--batch-size", "2", "--no-progress")
    assert code == 0, err
    rows, summary = load(out)
    assert_same(rows, clean[0])
    assert summary["device"] == "device_map=auto" and summary["layer_devices"] == ["cpu"]
    monkeypatch.setattr(MambaForCausalLM, "from_pretrained", real_load)
    for name, extra in (("plain", []), ("split_rollout", ["--device-map", "auto"])):
        if extra:
            monkeypatch.setattr(MambaForCausalLM, "from_pretrained", dispatched)
        code, _, err = run(capsys, "explain-dataset", files["csv"], "--out", tmp_path / name, "--method", "rollout",
                           "--limit", "4", "--no-progress", *extra)
        assert code == 0, err
    assert_same(load(tmp_path / "split_rollout")[0], load(tmp_path / "plain")[0])


# ------------------------------------------------------------------------ torchrun, gloo, 2 CPUs
def test_torchrun_two_processes_gloo(files, clean, tmp_path: Path) -> None:
    out = tmp_path / "o"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "implicit_attention", "explain-dataset", str(files["csv"]), "--label-column", "label",
               "--out", str(out), "--batch-size", "2", "--no-progress", "--reports", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("explained: 6 of 7 inputs") == 1  # rank 0 reports
    rows, summary = load(out)
    assert_same(rows, clean[0])
    assert summary["processes"] == 2 and summary["accuracy"] == clean[1]["accuracy"] and summary["complete"]
    assert sorted(p.name for p in out.iterdir()) == sorted(FINAL_FILES + ["reports"])
    # rank 0 wrote a full report for each of the first 2 explained inputs (--reports 2; a report takes
    # seconds), linked
    reports = sorted(int(p.name) for p in (out / "reports").iterdir())
    assert reports == [row["index"] for row in rows[:2]]
    assert all(f'href="reports/{i}/report.html"' in (out / "index.html").read_text() for i in reports)


# ------------------------------------------------------------------------------ --keep-columns, id
def test_results_keep_the_id_and_keep_columns(capsys, clean, tmp_path: Path) -> None:
    assert [row["id"] for row in clean[0]] == [str(row["index"]) for row in clean[0]]   # the CSV's id column
    path = tmp_path / "kept.jsonl"
    path.write_text("".join(json.dumps({"id": 100 + i, "text": t, "source": f"s{i}", "meta": {"n": i}}) + "\n"
                            for i, (t, _) in enumerate(ROWS[:2])) + json.dumps({"text": "a gorgeous film"}) + "\n")
    out = tmp_path / "run"
    code, _, err = run(capsys, "explain-dataset", path, "--out", out, "--keep-columns", "source,meta",
                       "--no-progress")
    assert code == 0, err
    rows = read_results(out / "results.jsonl")
    assert [(r["index"], r.get("id"), r["source"], r["meta"]) for r in rows] == \
        [(0, 100, "s0", {"n": 0}), (1, 101, "s1", {"n": 1}), (2, None, None, None)]
    assert "id" not in rows[2] and rows[0]["text"] == ROWS[0][0]
    assert json.loads((out / "run.json").read_text())["settings"]["keep_columns"] == ["source", "meta"]
    code, _, err = run(capsys, "explain-dataset", path, "--out", out, "--keep-columns", "source", "--no-progress")
    assert code == 2 and "--keep-columns" in err and "other settings" in err


def test_keep_columns_refusals(capsys, files, tmp_path: Path) -> None:
    for argv, message in (((files["csv"], "--keep-columns", "source"), "no column 'source' to keep"),
                          ((files["txt"], "--keep-columns", "source"), "a text file has no columns"),
                          ((files["csv"], "--keep-columns", "id,text"), "each result already has a field")):
        code, _, err = run(capsys, "explain-dataset", *argv, "--out", tmp_path / "o", "--no-progress")
        assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()
