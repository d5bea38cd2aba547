"""The benchmark's tables: means with bootstrap 95% intervals, paired comparisons, CSV, Markdown, plots.

Reads the ``<results>/<model>/<task>.jsonl`` files of :mod:`.runner`. Only examples that every
method of a model finished are used, so that the methods of one model are compared on the same
examples (paired).
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .stats import format_interval, mean_ci, paired_bootstrap

__all__ = ["METRICS", "complete_rows", "read_results", "summarise", "write_report"]

#: ``(column, title, better)``: the headline metrics; ``better`` is ``"lower"`` or ``"higher"``.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("auc_positive_delete", "pos. AUC (delete)", "lower"),
    ("auc_negative_delete", "neg. AUC (delete)", "higher"),
    ("auc_positive_replace", "pos. AUC (pad)", "lower"),
    ("auc_negative_replace", "neg. AUC (pad)", "higher"),
    ("dA_delete", "dA (delete)", "higher"),
    ("comprehensiveness", "compr.", "higher"),
    ("sufficiency", "suff.", "lower"),
    ("auc_positive_delete_accuracy", "pos. acc. AUC", "lower"),
    ("auc_negative_delete_accuracy", "neg. acc. AUC", "higher"),
    ("roc_auc", "loc. ROC AUC", "higher"),
    ("pointing", "pointing", "higher"),
)
GRADIENT_BASELINES = ("grad_x_input", "integrated_gradients", "smoothgrad", "occlusion", "lrp")


def read_results(directory: str | Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """``{(model, task): [record, ...]}`` from every ``<model>/<task>.jsonl`` under ``directory`` (and the
    shard files ``<task>-part<k>.jsonl`` of a split run), without the methods that failed on that
    model (``<task>.failures.json``: see :func:`read_failures`). A record seen twice is kept once."""
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("*/*.jsonl")):
        task = path.stem.split("-part")[0]
        failed = read_failures(path.with_name(f"{task}.jsonl"))
        rows = results.setdefault((path.parent.name, task), [])
        seen = {(row["id"], row["method"]) for row in rows}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line torn by an interruption
                continue
            if row["method"] not in failed and (row["id"], row["method"]) not in seen:
                seen.add((row["id"], row["method"]))
                rows.append(row)
    return results


def read_failures(results_file: Path) -> dict[str, str]:
    """``{method: error}`` of the methods that refused the model of a results file (its task's
    ``<task>.failures.json`` and those of its shards ``<task>-part<k>.failures.json``)."""
    task = results_file.name.removesuffix(".jsonl").split("-part")[0]
    failures: dict[str, str] = {}
    for path in [results_file.with_name(f"{task}.failures.json"),
                 *sorted(results_file.parent.glob(f"{task}-part*.failures.json"))]:
        if path.is_file():
            failures.update(json.loads(path.read_text()))
    return failures


def complete_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {example id: record}}`` restricted to the examples every method finished."""
    by_method: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_method[row["method"]][row["id"]] = row
    if not by_method:
        return {}
    common = set.intersection(*(set(records) for records in by_method.values()))
    return {method: {i: records[i] for i in sorted(common)} for method, records in by_method.items()}


def summarise(rows: list[dict[str, Any]], *, resamples: int = 2000) -> dict[str, Any]:
    """Per method and metric the mean and its bootstrap 95% interval, and the paired comparisons
    ``unified vs predecessor`` and ``unified vs the best gradient baseline`` (per metric, the
    baseline with the best mean), each as a difference with its interval and p-value."""
    complete = complete_rows(rows)
    summary: dict[str, Any] = {"methods": {}, "comparisons": [], "n": 0}
    if not complete:
        return summary
    ids = sorted(next(iter(complete.values())))
    summary["n"] = len(ids)
    for method, records in complete.items():
        entry = {}
        for column, _, _ in METRICS:
            values = [records[i][column] for i in ids if column in records[i]]
            if len(values) == len(ids) and values:
                entry[column] = mean_ci(values, resamples=resamples).to_dict()
        entry["seconds"] = float(np.mean([records[i].get("seconds", 0.0) for i in ids]))
        curves = [records[i]["curve_positive_delete"] for i in ids if "curve_positive_delete" in records[i]]
        if len(curves) == len(ids):                 # the mean deletion curve, for the plots of a merged report
            entry["curve_positive_delete"] = [float(v) for v in np.mean(curves, axis=0)]
        summary["methods"][method] = entry
    for column, _, better in METRICS:
        sign = 1 if better == "higher" else -1
        for unified in [m for m in complete if m.endswith("/unified")]:
            name = unified.split("/")[0]
            rivals = [m for m in complete if m.startswith(name + "/") and m != unified and not m.split("/")[1].startswith("no_")]
            baselines = [m for m in GRADIENT_BASELINES if m in complete and column in summary["methods"][m]]
            if baselines and name == "attribution":
                best = max(baselines, key=lambda m: sign * summary["methods"][m][column]["mean"])
                rivals.append(best)
            for rival in rivals:
                if column not in summary["methods"].get(rival, {}) or column not in summary["methods"][unified]:
                    continue
                a = [complete[unified][i][column] for i in ids]
                b = [complete[rival][i][column] for i in ids]
                result = paired_bootstrap(a, b, resamples=resamples)
                summary["comparisons"].append({"metric": column, "unified": unified, "rival": rival,
                                               "better": better, **result.to_dict(),
                                               "unified_better": bool(sign * result.difference > 0)})
    return summary


def _cell(entry: dict[str, Any], column: str) -> str:
    if column not in entry:
        return "-"
    interval = entry[column]
    from .stats import Interval

    return format_interval(Interval(**interval), scale=100.0, digits=1)


def write_report(results_dir: str | Path, out_dir: str | Path, *, titles: dict[str, str] | None = None,
                 plots: bool = True, keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``summary.json``, ``results.csv`` (one row per model, task, method and metric),
    ``tables.md`` and, with matplotlib, ``curves_<task>.png`` and ``heatmap_<task>_<metric>.png``.

    ``keep``: the summaries of an earlier report (its ``summary.json``), kept for every ``model/task``
    without records under ``results_dir``, so that rerunning some models updates their rows only.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    titles = titles or {}
    summaries = {}
    for (model, task), rows in read_results(results_dir).items():
        summaries[f"{model}/{task}"] = summarise(rows)
        if refused := read_failures(Path(results_dir) / model / f"{task}.jsonl"):
            summaries[f"{model}/{task}"]["refused"] = refused
    for key, summary in (keep or {}).items():
        summaries.setdefault(key, summary)
    summaries = {key: summaries[key] for key in sorted(summaries, key=lambda k: tuple(k.split("/")))}
    (out / "summary.json").write_text(json.dumps(summaries, indent=1) + "\n")
    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "task", "method", "metric", "mean", "low", "high", "n"])
        for key, summary in summaries.items():
            model, task = key.split("/")
            for method, entry in summary["methods"].items():
                for column, _, _ in METRICS:
                    if column in entry:
                        e = entry[column]
                        writer.writerow([model, task, method, column, e["mean"], e["low"], e["high"], e["n"]])
    lines = ["All figures x100, mean [bootstrap 95% interval] over the examples every method finished (n).", ""]
    for key, summary in summaries.items():
        model, task = key.split("/")
        columns = [c for c in METRICS if any(c[0] in e for e in summary["methods"].values())]
        lines += [f"### {titles.get(model, model)}, {task} (n = {summary['n']})", "",
                  "| method | " + " | ".join(f"{title} ({'↓' if better == 'lower' else '↑'})"
                                             for _, title, better in columns) + " | s/ex |",
                  "|---" * (len(columns) + 2) + "|"]
        for method, entry in summary["methods"].items():
            lines.append(f"| {method} | " + " | ".join(_cell(entry, c) for c, _, _ in columns)
                         + f" | {entry['seconds']:.2f} |")
        for method, error in summary.get("refused", {}).items():
            lines.append(f"| {method} | refused: {error[:160]} |")
        lines.append("")
        decisive = [c for c in summary["comparisons"] if c["metric"] in ("auc_positive_delete", "comprehensiveness",
                                                                           "roc_auc", "dA_delete")]
        if decisive:
            lines += ["| comparison | metric | difference x100 [95%] | p | unified better |", "|---|---|---|---|---|"]
            for c in decisive:
                lines.append(f"| {c['unified']} vs {c['rival']} | {c['metric']} | "
                             f"{100 * c['difference']:.1f} [{100 * c['low']:.1f}, {100 * c['high']:.1f}] | "
                             f"{c['p_value']:.3f} | {'yes' if c['unified_better'] else 'no'} |")
            lines.append("")
    (out / "tables.md").write_text("\n".join(lines) + "\n")
    (out / "headline.md").write_text(headline(summaries, titles))
    if plots:
        _plots(summaries, out, titles)
    return summaries


def _plots(summaries: dict[str, Any], out: Path, titles: dict[str, str]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - plots are optional
        return
    fractions = np.linspace(0, 1, 11)
    tasks = sorted({key.split("/")[1] for key in summaries})
    for task in tasks:
        (out / f"curves_{task}.png").unlink(missing_ok=True)
        models = [key.split("/")[0] for key in summaries if key.split("/")[1] == task]
        has_curve = lambda model: any("curve_positive_delete" in e for e in summaries[f"{model}/{task}"]["methods"].values())  # noqa: E731
        drawn_models = [model for model in models if has_curve(model)]
        if drawn_models and len(drawn_models) < len(models):
            print(f"curves_{task}.png: no mean curves stored for {', '.join(m for m in models if not has_curve(m))} "
                  "(kept from a summary written before curves were stored)")
        if drawn_models:
            _curves(summaries, task, drawn_models, fractions, out / f"curves_{task}.png", titles, plt)
        for column in ("auc_positive_delete", "roc_auc"):
            methods = sorted({m for key, s in summaries.items() if key.endswith("/" + task)
                              for m, e in s["methods"].items() if column in e})
            if not methods:
                continue
            grid = np.full((len(models), len(methods)), np.nan)
            for r, model in enumerate(models):
                entry = summaries[f"{model}/{task}"]["methods"]
                for c, method in enumerate(methods):
                    if column in entry.get(method, {}):
                        grid[r, c] = 100 * entry[method][column]["mean"]
            figure, axis = plt.subplots(figsize=(1 + 0.55 * len(methods), 1 + 0.35 * len(models)))
            image = axis.imshow(grid, cmap="viridis_r" if column.startswith("auc_positive") else "viridis", aspect="auto")
            axis.set_xticks(range(len(methods)), methods, rotation=70, fontsize=7, ha="right")
            axis.set_yticks(range(len(models)), [titles.get(m, m) for m in models], fontsize=7)
            for (r, c), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    axis.text(c, r, f"{value:.0f}", ha="center", va="center", fontsize=5, color="white")
            figure.colorbar(image, ax=axis, label=column)
            # the bounding box grows to the rotated labels (a one-model grid is too short for tight_layout)
            figure.savefig(out / f"heatmap_{task}_{column}.png", dpi=110, bbox_inches="tight")
            plt.close(figure)


def _curves(summaries: dict[str, Any], task: str, models: list[str], fractions: np.ndarray, path: Path,
            titles: dict[str, str], plt) -> None:
    """One panel per model: each method's mean deletion curve (predecessor variants dashed, ablations left
    out), one colour per method name in every panel."""
    columns = min(4, len(models))
    rows_n = int(np.ceil(len(models) / columns))
    figure, axes = plt.subplots(rows_n, columns, figsize=(4 * columns, 3 * rows_n), squeeze=False)
    names = sorted({m.split("/")[0] for model in models for m in summaries[f"{model}/{task}"]["methods"]})
    palette = plt.get_cmap("tab20")
    colours = {name: palette(i % 20) for i, name in enumerate(names)}
    drawn: dict[str, Any] = {}
    for axis, model in zip(axes.flat, models):
        methods = summaries[f"{model}/{task}"]["methods"]
        for method in sorted(methods):
            if method.split("/")[-1].startswith("no_") or "curve_positive_delete" not in methods[method]:
                continue
            kind = method.split("/")[1] if "/" in method else ""
            label = method if kind in ("", "unified") else f"{method.split('/')[0]}/predecessor"
            (line,) = axis.plot(fractions, methods[method]["curve_positive_delete"], linewidth=1,
                                color=colours[method.split("/")[0]], linestyle="-" if kind in ("", "unified") else "--")
            drawn.setdefault(label, line)
        axis.set_title(titles.get(model, model), fontsize=9)
        axis.set_xlabel("fraction deleted (most relevant first)", fontsize=7)
        axis.set_ylabel("p(predicted label)", fontsize=7)
    for axis in list(axes.flat)[len(models):]:
        axis.axis("off")
    if drawn:
        figure.legend(list(drawn.values()), list(drawn), loc="lower center", ncol=6, fontsize=6)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)


#: The headline metric of each task and whether lower is better.
HEADLINE = {"sentiment": ("auc_positive_delete", "positive perturbation AUC (deletion), lower is better"),
            "groundtruth": ("roc_auc", "localisation ROC AUC of the planted tokens, higher is better")}


def headline(summaries: dict[str, Any], titles: dict[str, str]) -> str:
    """One Markdown table per task: per model, attribution with the unified formulation, with the
    predecessor's variant, the best gradient baseline and random, x100 with 95% intervals; a star
    marks a paired difference to the unified map with p < 0.05."""
    blocks = []
    for task, (column, what) in HEADLINE.items():
        better = dict((c, b) for c, _, b in METRICS)[column]
        sign = 1 if better == "higher" else -1
        rows = [f"**{task}**: {what}; x100, mean [95% bootstrap interval]; * paired p < 0.05 against unified.", "",
                "| model | n | attribution, unified | attribution, predecessor | best gradient baseline | random |",
                "|---|---|---|---|---|---|"]
        for key, summary in summaries.items():
            model, model_task = key.split("/")
            methods = summary["methods"]
            if model_task != task or "attribution/unified" not in methods or column not in methods["attribution/unified"]:
                continue
            tests = {c["rival"]: c for c in summary["comparisons"]
                     if c["metric"] == column and c["unified"] == "attribution/unified"}

            def cell(method: str) -> str:
                if method not in methods or column not in methods[method]:
                    return "-"
                star = "*" if method in tests and tests[method]["p_value"] < 0.05 else ""
                return _cell(methods[method], column) + star

            predecessor = next((m for m in methods if m.startswith("attribution/") and m != "attribution/unified"
                                and not m.split("/")[1].startswith("no_")), None)
            baselines = [m for m in GRADIENT_BASELINES if column in methods.get(m, {})]
            best = max(baselines, key=lambda m: sign * methods[m][column]["mean"]) if baselines else None
            rows.append(f"| {titles.get(model, model)} | {summary['n']} | {cell('attribution/unified')} | "
                        + (f"{cell(predecessor)} ({predecessor.split('/')[1]})" if predecessor else "-") + " | "
                        + (f"{cell(best)} ({best})" if best else "-") + f" | {cell('random')} |")
        if len(rows) > 4:  # a task nobody ran gets no empty table
            blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"
