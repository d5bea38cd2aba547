"""The benchmark runner, its report and its command: real numbers on the bundled and zoo models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import implicit_attention as ia
from implicit_attention.benchmark import report, runner
from implicit_attention.benchmark.zoo import zoo_model_dir
from implicit_attention.loading import load_model
from implicit_attention.text import encode_text

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bundled():
    return load_model()


def test_method_specs_follow_what_each_model_offers(bundled):
    keys = [spec.key for spec in runner.method_specs(bundled.model)]
    assert {"attribution/unified", "attribution/s6", "rollout/s6", "paper/s6", "lrp"} <= set(keys)
    assert {"attribution/no_conv", "attribution/no_gate", "attribution/no_act"} <= set(keys)
    assert {"paper/no_conv", "paper/no_gate", "paper/no_act"} <= set(keys)
    gpt2 = [spec.key for spec in runner.method_specs(load_model(zoo_model_dir("gpt2")).model)]
    assert "attribution/unified" in gpt2 and not any(k.endswith(("/s6", "/no_conv")) for k in gpt2)
    # Jamba: its Mamba layers' variants (its attention layer stays as it is under them)
    jamba = [spec.key for spec in runner.method_specs(load_model(zoo_model_dir("jamba")).model)]
    assert {"attribution/s6", "rollout/s6", "attribution/no_conv"} <= set(jamba)


def test_the_gate_ablation_cancels_under_attribution_but_not_under_the_papers_recipe(bundled):
    """Why the ablations also run under ``paper``: Mamba's output gate is a row scale of every channel's
    matrix, which attribution's gradient carries back (``no_gate`` = ``unified``), while the paper's
    ``relu(A)`` channel mean weighs the channels by it."""
    ids = torch.tensor([encode_text(bundled, "an utterly charming and moving film").ids])
    maps = {(method, variant): ia.explain(bundled.model, ids, method=method, variant=variant, check=False)
            for method in runner.ABLATED_METHODS for variant in ("unified", "no_gate")}
    torch.testing.assert_close(maps["attribution", "no_gate"], maps["attribution", "unified"], rtol=1e-5, atol=1e-9)
    difference = (maps["paper", "no_gate"] - maps["paper", "unified"]).abs().max()
    assert difference > 1e-2 * maps["paper", "unified"].abs().max()


def test_the_batched_scorer_equals_one_forward_per_sequence(bundled):
    label_ids = [bundled.label_ids[name] for name in bundled.labels]
    scorer = runner.LabelScorer(bundled.model, label_ids, bundled.pad_token_id, batch_size=3)
    sequences = [torch.tensor(encode_text(bundled, text).ids) for text in
                 ("a gem", "an utterly charming and moving film", "dull", "it is what it is, no more")]
    batched = scorer(sequences)
    with torch.no_grad():
        one_by_one = torch.stack([bundled.model(s[None]).logits[0, -1, label_ids] for s in sequences])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_a_run_scores_every_method_resumes_and_its_curves_are_real_forwards(bundled, tmp_path):
    examples = [runner.BenchmarkExample("a", "an utterly charming and moving film", 1),
                runner.BenchmarkExample("b", "a dull , lifeless mess", 0)]
    specs = [spec for spec in runner.method_specs(bundled.model)
             if spec.key in ("random", "attribution/unified", "attribution/s6")]
    out = tmp_path / "mamba" / "sentiment.jsonl"
    first = runner.run_model_task(REPO / "src/implicit_attention/bundled/rt-sentiment-mamba", examples, out,
                                  specs=specs, model_name="mamba", task_name="sentiment")
    assert first["written"] == 6 and not first["failures"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    label_ids = [bundled.label_ids[name] for name in bundled.labels]
    for row in rows:
        example = next(e for e in examples if e.id == row["id"])
        encoded = encode_text(bundled, example.text)
        ids = torch.tensor(encoded.ids)
        text = [i for i, inside in enumerate(encoded.in_span) if inside]
        with torch.no_grad():
            full = bundled.model(ids[None]).logits[0, -1, label_ids].softmax(-1)
            # everything of the text deleted: BOS and the template remain
            kept = [i for i in range(len(ids)) if i not in text]
            empty = bundled.model(ids[kept][None]).logits[0, -1, label_ids].softmax(-1)
        predicted = int(full.argmax())
        assert row["predicted"] == predicted and row["tokens"] == len(text)
        assert row["curve_positive_delete"][0] == pytest.approx(float(full[predicted]), abs=1e-4)
        assert row["curve_positive_delete"][-1] == pytest.approx(float(empty[predicted]), abs=1e-4)
        assert row["curve_negative_delete"][-1] == pytest.approx(float(empty[predicted]), abs=1e-4)
        assert row["dA_delete"] == pytest.approx(row["auc_negative_delete"] - row["auc_positive_delete"], abs=1e-9)
    # resumed: nothing recomputed; a torn last line (an interrupted write) is ignored and redone
    assert runner.run_model_task(REPO / "src/implicit_attention/bundled/rt-sentiment-mamba", examples, out,
                                 specs=specs)["written"] == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    assert len(runner.finished_keys(out)) == 5
    again = runner.run_model_task(REPO / "src/implicit_attention/bundled/rt-sentiment-mamba", examples, out,
                                  specs=specs)
    assert again["written"] == 1  # only the record that was torn
    assert len(runner.finished_keys(out)) == 6


def test_planted_keywords_are_located_at_their_tokens(bundled, tmp_path):
    text = "we went to the market and bought a banana and a kettle for the trip"
    start = text.index("banana")
    example = runner.BenchmarkExample("g", text, 0, ((start, start + len("banana")),))
    specs = [spec for spec in runner.method_specs(bundled.model) if spec.key == "random"]
    out = tmp_path / "gt.jsonl"
    runner.run_model_task(REPO / "src/implicit_attention/bundled/rt-sentiment-mamba", [example], out, specs=specs,
                          perturbation=False)
    row = json.loads(out.read_text())
    assert "auc_positive_delete" not in row and 0.0 <= row["roc_auc"] <= 1.0
    # the same localisation, recomputed from the method's relevance by hand
    from implicit_attention.benchmark.groundtruth import planted_token_positions
    from implicit_attention.explanations.api import explain

    encoded = encode_text(bundled, text)
    planted = planted_token_positions([o or (0, 0) for o in encoded.offsets], example.planted)
    assert "".join(bundled.tokenizer.convert_ids_to_tokens([encoded.ids[i] for i in planted])).strip("Ġ") == "banana"
    positions = [i for i, inside in enumerate(encoded.in_span) if inside]
    relevance = explain(bundled.model, torch.tensor(encoded.ids)[None], method="random", seed=0)[0]
    scores = relevance[positions]
    positive = [scores[positions.index(p)] for p in planted]
    negative = [scores[i] for i, p in enumerate(positions) if p not in planted]
    expected = sum((float(a > b) + 0.5 * float(a == b)) for a in positive for b in negative) / (len(positive) * len(negative))
    assert row["roc_auc"] == pytest.approx(expected)


def _rows(method, values, key="auc_positive_delete"):
    return [{"id": str(i), "method": method, key: v, "seconds": 0.1} for i, v in enumerate(values)]


def test_the_summary_pairs_methods_on_common_examples_and_tests_the_difference():
    unified = [0.2, 0.25, 0.3, 0.22, 0.28, 0.21, 0.26, 0.24]
    rows = _rows("attribution/unified", unified) + _rows("attribution/s6", [v + 0.1 for v in unified]) \
        + _rows("grad_x_input", [v + 0.05 for v in unified[:6]])  # two examples unfinished
    summary = report.summarise(rows, resamples=500)
    assert summary["n"] == 6  # only the examples every method finished
    mean = summary["methods"]["attribution/unified"]["auc_positive_delete"]["mean"]
    assert mean == pytest.approx(sum(unified[:6]) / 6)
    versus = {c["rival"]: c for c in summary["comparisons"] if c["metric"] == "auc_positive_delete"}
    assert versus["attribution/s6"]["difference"] == pytest.approx(-0.1)
    assert versus["attribution/s6"]["unified_better"] and versus["attribution/s6"]["p_value"] < 0.05
    assert versus["grad_x_input"]["difference"] == pytest.approx(-0.05)


def test_the_report_skips_failed_methods_and_writes_its_files(tmp_path):
    results = tmp_path / "results" / "toy"
    results.mkdir(parents=True)
    rows = _rows("attribution/unified", [0.1, 0.2, 0.3]) + _rows("lrp", [0.5])
    (results / "sentiment.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (results / "sentiment.failures.json").write_text(json.dumps({"lrp": "RuntimeError: no faithful rule"}))
    summaries = report.write_report(tmp_path / "results", tmp_path / "report", plots=False)
    assert summaries["toy/sentiment"]["n"] == 3 and "lrp" not in summaries["toy/sentiment"]["methods"]
    tables = (tmp_path / "report" / "tables.md").read_text()
    assert "| attribution/unified | 20.0 [" in tables and "lrp | refused: RuntimeError: no faithful rule" in tables
    assert (tmp_path / "report" / "results.csv").read_text().count("attribution/unified") == 1


def test_a_rerun_of_some_models_keeps_the_other_models_tables(tmp_path):
    """write_report(keep=...): the rerun model's rows come from its records (with its refusals and mean curves),
    every other model/task from the earlier summary, as it was; the plots need only the summaries."""
    first = tmp_path / "first"
    for model, shift in (("toy", 0.0), ("other", 0.3)):
        (first / model).mkdir(parents=True)
        rows = [{**r, "curve_positive_delete": [1.0 - shift] * 5 + [0.5] * 6}
                for r in _rows("attribution/unified", [0.1 + shift, 0.2 + shift, 0.3 + shift])]
        (first / model / "sentiment.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    earlier = report.write_report(first, tmp_path / "report-1", plots=False)
    assert earlier["other/sentiment"]["methods"]["attribution/unified"]["curve_positive_delete"] == pytest.approx(
        [0.7] * 5 + [0.5] * 6)
    rerun = tmp_path / "rerun" / "toy"
    rerun.mkdir(parents=True)
    rows = _rows("attribution/unified", [0.4, 0.5, 0.6, 0.7]) + _rows("lrp", [0.5])
    (rerun / "sentiment.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (rerun / "sentiment.failures.json").write_text(json.dumps({"lrp": "RuntimeError: no faithful rule"}))
    merged = report.write_report(tmp_path / "rerun", tmp_path / "report-2", plots=True,
                                 keep=json.loads((tmp_path / "report-1" / "summary.json").read_text()))
    assert list(merged) == ["other/sentiment", "toy/sentiment"]
    assert merged["other/sentiment"] == earlier["other/sentiment"]
    assert merged["toy/sentiment"]["n"] == 4 and merged["toy/sentiment"]["refused"] == {
        "lrp": "RuntimeError: no faithful rule"}
    assert merged["toy/sentiment"]["methods"]["attribution/unified"]["auc_positive_delete"]["mean"] == pytest.approx(0.55)
    tables = (tmp_path / "report-2" / "tables.md").read_text()
    assert "| attribution/unified | 55.0 [" in tables and "| attribution/unified | 50.0 [" in tables
    assert "lrp | refused: RuntimeError" in tables
    pytest.importorskip("matplotlib")
    assert (tmp_path / "report-2" / "curves_sentiment.png").is_file()            # drawn from the kept summary
    assert (tmp_path / "report-2" / "heatmap_sentiment_auc_positive_delete.png").is_file()


def test_shard_files_are_read_as_one_task_each_record_once_with_every_shards_failures(tmp_path):
    results = tmp_path / "toy"
    results.mkdir()
    row = {"method": "attribution/unified", "seconds": 0.1, "auc_positive_delete": 0.5}
    (results / "sentiment.jsonl").write_text(json.dumps({**row, "id": "a"}) + "\n")
    (results / "sentiment-part0.jsonl").write_text(json.dumps({**row, "id": "b"}) + "\n"
                                                   + json.dumps({**row, "id": "a"}) + "\n")  # a seen twice
    (results / "sentiment-part1.jsonl").write_text(json.dumps({**row, "id": "c"}) + "\n"
                                                   + json.dumps({**row, "id": "c", "method": "lrp"}) + "\n")
    (results / "sentiment-part1.failures.json").write_text(json.dumps({"lrp": "RuntimeError: refused"}))
    merged = report.read_results(tmp_path)
    assert list(merged) == [("toy", "sentiment")]
    assert sorted(r["id"] for r in merged[("toy", "sentiment")]) == ["a", "b", "c"]
    assert report.read_failures(results / "sentiment-part0.jsonl") == {"lrp": "RuntimeError: refused"}
    # a shard resumes knowing what every other file of its task holds
    assert runner.finished_keys(runner.shard_file(results, "sentiment", 2)) == {
        ("a", "attribution/unified"), ("b", "attribution/unified"), ("c", "attribution/unified"), ("c", "lrp")}
    assert runner.task_result_files(results, "groundtruth") == []
    # the index that travels to another machine: the same pairs, which a run there skips
    assert runner.write_done_index(tmp_path, tmp_path / "done") == 4
    elsewhere = tmp_path / "elsewhere" / "toy"
    elsewhere.mkdir(parents=True)
    (elsewhere / "sentiment.done").write_bytes((tmp_path / "done" / "toy" / "sentiment.done").read_bytes())
    assert runner.finished_keys(runner.shard_file(elsewhere, "sentiment", 0)) == runner.finished_keys(
        results / "sentiment.jsonl")
    assert report.read_results(tmp_path / "elsewhere") == {}  # an index is not a result
    # results moved away (the model was retrained): indexing again drops the stale list
    for file in results.glob("sentiment*"):
        file.unlink()
    (results / "groundtruth.jsonl").write_text(json.dumps({**row, "id": "g"}) + "\n")
    assert runner.write_done_index(tmp_path, tmp_path / "done") == 1
    assert not (tmp_path / "done" / "toy" / "sentiment.done").exists()
    assert (tmp_path / "done" / "toy" / "groundtruth.done").read_text() == '["g", "attribution/unified"]\n'


def test_the_command_prepares_runs_and_reports(tmp_path):
    script = str(REPO / "benchmarks" / "faithfulness.py")
    assert "resumable" in subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                                         check=True).stdout
    root = tmp_path / "bench"
    (root / "examples").mkdir(parents=True)
    empty = subprocess.run([sys.executable, script, "report", "--root", str(root)], capture_output=True, text=True)
    assert empty.returncode == 1 and "no results in" in empty.stderr and not (root / "report").exists()
    (root / "examples" / "sentiment.jsonl").write_text(
        json.dumps({"id": "x", "text": "a gorgeous , witty , seductive movie", "label": 1}) + "\n"
        + json.dumps({"id": "y", "text": "dull", "label": 0}) + "\n")
    # two shards: each worker takes every other example and writes its own file
    run = subprocess.run([sys.executable, script, "run", "--root", str(root), "--models", "gpt2", "--tasks",
                          "sentiment", "--limit", "2", "--shards", "2", "--no-ablations"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    parts = [[json.loads(line) for line in (root / "results" / "gpt2" / f"sentiment-part{k}.jsonl").read_text()
              .splitlines()] for k in (0, 1)]
    assert {row["id"] for row in parts[0]} == {"x"} and {row["id"] for row in parts[1]} == {"y"}
    assert {row["method"] for row in parts[0]} >= {"random", "grad_x_input", "attribution/unified", "rollout/unified"}
    # unsharded again: both examples are found finished in the shards' files
    again = subprocess.run([sys.executable, script, "run", "--root", str(root), "--models", "gpt2", "--tasks",
                            "sentiment", "--limit", "2"], capture_output=True, text=True)
    assert "'written': 0" in again.stdout, again.stdout + again.stderr[-2000:]
    done = subprocess.run([sys.executable, script, "report", "--root", str(root)], capture_output=True, text=True)
    assert done.returncode == 0 and "GPT-2, sentiment (n = 2)" in done.stdout
    assert (root / "report" / "curves_sentiment.png").stat().st_size > 1000


def test_the_readme_tables_are_the_reports_own():
    """README's benchmark tables are what `faithfulness.py report` wrote, regenerated here from the
    committed summary, and the zoo table is the export's."""
    from implicit_attention.benchmark.reference import REFERENCES
    from implicit_attention.benchmark.zoo import ZOO

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from train_zoo import zoo_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    docs = REPO / "docs" / "benchmark"
    summaries = json.loads((docs / "summary.json").read_text())
    titles = {k: v.title for k, v in {**ZOO, **REFERENCES}.items()}
    table = report.headline(summaries, titles)
    readme = (REPO / "README.md").read_text()
    assert table == (docs / "headline.md").read_text() and table in readme
    zoo = zoo_table(json.loads((REPO / "zoo" / "zoo.json").read_text()))
    assert zoo == (REPO / "zoo" / "README.md").read_text() and zoo in readme


def test_workers_run_at_most_jobs_at_once_log_and_report_failures(tmp_path, capsys):
    from implicit_attention.benchmark.workers import run_workers

    script = "import sys, time; print('hello', sys.argv[1]); time.sleep(0.3); sys.exit(sys.argv[1] == 'b')"
    failed = run_workers(["a", "b", "c"], lambda name: [sys.executable, "-c", script, name],
                         lambda name: tmp_path / "logs" / f"{name}.txt", jobs=2, poll_seconds=0.05)
    assert failed == ["b"]
    assert (tmp_path / "logs" / "c.txt").read_text() == "hello c\n"
    out = capsys.readouterr().out
    assert "b: FAILED (exit 1)" in out and "a: done" in out and "failed: b" in out


def test_workers_share_the_cpus_unless_told(tmp_path, monkeypatch):
    """Each worker's OMP_NUM_THREADS is its share of the CPUs (8 CPUs, 2 at once: 4), unless already set."""
    from implicit_attention.benchmark import workers

    script = "import os; print(os.environ['OMP_NUM_THREADS'])"
    log = lambda name: tmp_path / f"{name}.txt"  # noqa: E731
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    workers.run_workers(["a"], lambda name: [sys.executable, "-c", script], log, jobs=2, poll_seconds=0.05)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    workers.run_workers(["b"], lambda name: [sys.executable, "-c", script], log, jobs=2, poll_seconds=0.05)
    assert log("a").read_text() == "4\n" and log("b").read_text() == "3\n"


def test_offered_variants_keep_a_hybrids_attention_layers_unified_and_need_every_recurrent_layer():
    from types import SimpleNamespace

    from implicit_attention.decomposition import offered_variants

    attention = SimpleNamespace(name="attention", variants=("unified",), keeps_unified=True)
    gated = SimpleNamespace(name="attention_gated", variants=("unified", "no_gate"), keeps_unified=True)
    mamba = SimpleNamespace(name="mamba", variants=("unified", "s6", "no_conv"), keeps_unified=False)
    rwkv = SimpleNamespace(name="rwkv4", variants=("unified", "wkv", "no_shift"), keeps_unified=False)
    assert offered_variants([("a", None, attention), ("m", None, mamba)]) == ["unified", "s6", "no_conv"]
    assert offered_variants([("a", None, attention)]) == ["unified"]
    assert offered_variants([("m", None, mamba), ("r", None, rwkv)]) == ["unified"]  # no variant both offer
    # an attention layer with a variant of its own keeps unified under the others' variants too, and its
    # own variant is offered only where every recurrent layer has it as well
    assert offered_variants([("g", None, gated), ("m", None, mamba)]) == ["unified", "s6", "no_conv"]


def test_the_headline_has_no_table_for_a_task_nobody_ran():
    rows = _rows("attribution/unified", [0.2, 0.3, 0.25]) + _rows("random", [0.6, 0.7, 0.65])
    table = report.headline({"toy/sentiment": report.summarise(rows, resamples=100)}, {"toy": "Toy"})
    assert "**sentiment**" in table and "| Toy | 3 |" in table and "**groundtruth**" not in table


def test_a_decompositions_repr_is_one_line(bundled):
    ids = torch.tensor([encode_text(bundled, "a gem").ids])
    text = repr(__import__("implicit_attention").decompose(bundled.model, ids))
    assert text.startswith("Decomposition(4 layers, variant='unified', input 1x") and "\n" not in text
    assert "max reconstruction error" in text and "tensor" not in text


def test_keep_belongs_to_the_report_and_needs_a_file(tmp_path):
    script = str(REPO / "benchmarks" / "faithfulness.py")
    wrong_step = subprocess.run([sys.executable, script, "run", "--keep", str(tmp_path / "s.json"), "--root",
                                 str(tmp_path)], capture_output=True, text=True)
    assert wrong_step.returncode == 1 and "--keep belongs to `report`" in wrong_step.stderr
    results = tmp_path / "results" / "toy"
    results.mkdir(parents=True)
    (results / "sentiment.jsonl").write_text(json.dumps(_rows("random", [0.5])[0]) + "\n")
    missing = subprocess.run([sys.executable, script, "report", "--keep", str(tmp_path / "none.json"), "--root",
                              str(tmp_path)], capture_output=True, text=True)
    assert missing.returncode == 1 and "no such summary file" in missing.stderr
