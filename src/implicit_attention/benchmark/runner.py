"""Running the faithfulness benchmark: every method on every example of one model and task.

For each example the model's prediction on the whole prompt is explained (the explained score is
the label contrast, :class:`~implicit_attention.explanations.target.Contrast`), then, with the
relevance ranked over the text's own tokens only (BOS and the template are never removed; nor are a
sequence classifier's ``[CLS]`` and ``[SEP]``):

- perturbation curves at 0%, 10%, ..., 100% removed, most relevant first (positive) and least
  relevant first (negative), by deleting tokens and, separately, by replacing them with the pad
  token; each curve records the predicted label's probability and whether the prediction is kept;
- ERASER comprehensiveness and sufficiency at 5/10/20/50% (deletion);
- MambaLRP's ``dA`` (deletion, on the probability);
- on the ground-truth task, the localisation scores against the planted tokens.

A causal LM (the zoo) is scored by its label words' logits at the end of the prompt
(:class:`LabelScorer`); a sequence classifier (the pretrained reference,
:mod:`.reference`) by its class logits (:class:`ClassifierScorer`). Deletion and pad replacement
are the same for both: a replaced token is the pad token as an input the model reads.

Each finished example is one line of ``<out>/<model>/<task>.jsonl`` (written and flushed as it
finishes), so an interrupted run resumes without recomputing anything.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics

__all__ = ["BenchmarkExample", "ClassifierScorer", "LabelScorer", "MethodSpec", "finished_keys", "load_examples",
           "method_specs", "run_model_task", "shard_file", "task_result_files"]

#: Options of the baselines in the benchmark (the library's defaults, written out).
BASELINE_OPTIONS: dict[str, dict[str, Any]] = {
    "random": {"seed": 0},
    "grad_x_input": {},
    "integrated_gradients": {"steps": 32, "baseline": "zeros"},
    "occlusion": {"window": 1},
    "smoothgrad": {"samples": 16, "seed": 0},
    "lrp": {},
}
MATRIX_METHODS = ("raw", "rollout", "attribution", "paper")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the tables: a method with its options.

    ``key`` names it in results (``"attribution/unified"``, ``"rollout/s6"``, ``"grad_x_input"``);
    ``role`` is ``"unified"``, ``"predecessor"``, ``"ablation"`` or ``"baseline"``.
    """

    key: str
    method: str
    role: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BenchmarkExample:
    """An example to explain: its text, true label index and, on the ground-truth task, the
    character spans of the planted keywords in ``text``."""

    id: str
    text: str
    label: int
    planted: tuple[tuple[int, int], ...] = ()


def model_variants(model: torch.nn.Module) -> tuple[str | None, list[str]]:
    """The predecessor variant (the core recurrence alone: ``s6``, ``ssd``, ``wkv``, ...) and the
    ablations (``no_*``) that every recurrent layer of ``model`` offers (a hybrid's plain attention
    layers stay as they are under them: the rule of :func:`~implicit_attention.decomposition.check_variant`);
    ``(None, [])`` for a Transformer."""
    from ..architectures.registry import model_layers
    from ..decomposition import offered_variants

    offered = offered_variants(model_layers(model))
    predecessors = [v for v in offered if v != "unified" and not v.startswith("no_")]
    return (predecessors[0] if predecessors else None), [v for v in offered if v.startswith("no_")]


def lrp_supported(model: torch.nn.Module) -> bool:
    from ..explanations.lrp import supports_lrp

    return supports_lrp(model)


def method_specs(model: torch.nn.Module, *, ablations: bool = True, baselines: Iterable[str] | None = None
                 ) -> list[MethodSpec]:
    """Every method the benchmark runs on ``model``: the baselines, the matrix methods with the
    unified formulation and with the predecessor's variant, and attribution and the paper's recipe
    under each ablation."""
    predecessor, ablation_variants = model_variants(model)
    specs = []
    for name in baselines if baselines is not None else BASELINE_OPTIONS:
        if name == "lrp" and not lrp_supported(model):
            continue
        specs.append(MethodSpec(name, name, "baseline", dict(BASELINE_OPTIONS[name])))
    for name in MATRIX_METHODS:
        specs.append(MethodSpec(f"{name}/unified", name, "unified", {"variant": "unified"}))
        if predecessor is not None:
            specs.append(MethodSpec(f"{name}/{predecessor}", name, "predecessor", {"variant": predecessor}))
    if ablations:
        # under attribution an output-side factor (a gate, a norm: a row scale) cancels by construction,
        # the gradient carrying it back; the paper's recipe (relu(A) scaled by token saliency) keeps it,
        # so the ablations run under both
        for method in ABLATED_METHODS:
            for variant in ablation_variants:
                specs.append(MethodSpec(f"{method}/{variant}", method, "ablation", {"variant": variant, "check": False}))
    return specs


#: The matrix methods the ablation rows run under (see :func:`method_specs`).
ABLATED_METHODS = ("attribution", "paper")


#: Methods that only call the model (outputs and input gradients), so a parallel scan may stand in.
PARALLEL_SAFE = frozenset({"random", "grad_x_input", "integrated_gradients", "occlusion", "smoothgrad"})


@contextlib.contextmanager
def parallel_forms(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """The training module's parallel scans (mambapy, RWKV-4's parallel WKV) for the duration."""
    from .training import disable_fast_training, enable_fast_training

    if not enabled:
        yield
        return
    enable_fast_training(model)
    try:
        yield
    finally:
        disable_fast_training(model)


def load_examples(path: str | Path, limit: int | None = None) -> list[BenchmarkExample]:
    """Examples from a JSON-lines file with ``text``, ``label`` and optionally ``id`` and ``planted``."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if limit is not None and len(examples) >= limit:
                break
            row = json.loads(line)
            examples.append(BenchmarkExample(str(row.get("id", index)), row["text"], int(row["label"]),
                                             tuple(tuple(span) for span in row.get("planted", ()))))
    return examples


def shard_file(directory: Path, task: str, shard: int | None = None) -> Path:
    """Where the results of ``task`` go: ``<task>.jsonl``, or ``<task>-part<k>.jsonl`` for shard ``k`` of
    a run split over several workers (each writes its own file; :func:`task_result_files` reads all)."""
    return directory / (f"{task}.jsonl" if shard is None else f"{task}-part{shard}.jsonl")


def task_result_files(directory: Path, task: str) -> list[Path]:
    """Every results file of ``task`` in a model's directory: the unsharded one and each shard's."""
    files = [directory / f"{task}.jsonl"] + sorted(directory.glob(f"{task}-part*.jsonl"))
    return [f for f in files if f.is_file()]


def finished_keys(path: Path) -> set[tuple[str, str]]:
    """``(example id, method key)`` of every record already in a results file and in the other files
    of its task (shards of earlier runs, however they were split, and a ``<task>.done`` index of
    records kept elsewhere: :func:`write_done_index`); a torn last line, from an interrupted
    write, is ignored and recomputed."""
    done: set[tuple[str, str]] = set()
    task = path.name.removesuffix(".jsonl").split("-part")[0]
    for file in {path, *task_result_files(path.parent, task), path.parent / f"{task}.done"}:
        if not file.is_file():
            continue
        for line in file.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done.add((row[0], row[1]) if isinstance(row, list) else (row["id"], row["method"]))
    return done


def write_done_index(results: Path, out: Path) -> int:
    """Write ``out/<model>/<task>.done`` (JSON lines ``[id, method]``) for every task under ``results``:
    what a run on another machine should skip, a small fraction of the results' size (copied beside
    that run's results, :func:`finished_keys` reads it). An index left from earlier results that are
    gone (a model retrained, its results moved away) is removed: it would make the other machine skip
    work that was never done for the model it has now. Returns the number of pairs written."""
    for stale in Path(out).glob("*/*.done"):
        stale.unlink()
    total = 0
    for model in sorted(p for p in Path(results).iterdir() if p.is_dir()):
        tasks = {f.name.removesuffix(".jsonl").split("-part")[0] for f in model.glob("*.jsonl")}
        for task in sorted(tasks):
            keys = sorted(finished_keys(shard_file(model, task)))
            (out / model.name).mkdir(parents=True, exist_ok=True)
            (out / model.name / f"{task}.done").write_text("".join(json.dumps(list(k)) + "\n" for k in keys))
            total += len(keys)
    return total


class LabelScorer:
    """The label words' logits at the last position of each sequence: a :class:`metrics.Scorer`.

    Sequences are right-padded into batches (the models are causal, so padding after a sequence
    never changes its last position's logits). :meth:`prefetch` scores many sequences at once and
    keeps the results, so that the metrics' many small calls become a few large batches.
    """

    def __init__(self, model: torch.nn.Module, label_ids: Sequence[int], pad_id: int, batch_size: int = 256):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.device = next(model.parameters()).device
        self.label_ids = torch.tensor(list(label_ids), device=self.device)
        self.cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.recording: list[torch.Tensor] | None = None

    @torch.no_grad()
    def _score(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = []
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = [sequences[i] for i in order[start:start + self.batch_size]]
            width = max(len(s) for s in chunk)
            batch = torch.full((len(chunk), width), self.pad_id, dtype=torch.long, device=self.device)
            mask = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
            for row, sequence in enumerate(chunk):
                batch[row, : len(sequence)] = sequence.to(self.device)
                mask[row, : len(sequence)] = 1
            rows.append(self._label_logits(batch, mask).cpu())
        scores = torch.empty(len(sequences), len(self.label_ids))
        scores[order] = torch.cat(rows)
        return scores

    def _label_logits(self, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, labels]`` of a right-padded batch: the label words' logits at each sequence's last
        token (no mask needed: a causal model's last real token never reads the padding after it)."""
        last = mask.sum(dim=1) - 1
        logits = self.model(batch, use_cache=False).logits.float()
        return logits[torch.arange(len(batch), device=self.device), last][:, self.label_ids]

    def prefetch(self, sequences: Sequence[torch.Tensor]) -> None:
        """Score every sequence not yet cached, in large batches."""
        unique = {tuple(s.tolist()): s for s in sequences}
        missing = [s for key, s in unique.items() if key not in self.cache]
        if missing:
            for sequence, row in zip(missing, self._score(missing)):
                self.cache[tuple(sequence.tolist())] = row

    def clear(self) -> None:
        self.cache.clear()

    def __call__(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.recording is not None:  # a dry run that only collects what will be asked
            self.recording.extend(sequences)
            return torch.zeros(len(sequences), len(self.label_ids))
        self.prefetch(sequences)
        return torch.stack([self.cache[tuple(s.tolist())] for s in sequences])


class ClassifierScorer(LabelScorer):
    """A sequence classifier's logits of the labels ``label_ids`` (class indices): a :class:`metrics.Scorer`.

    Sequences are right-padded into batches WITH their attention mask (a BERT reads in both
    directions, so unmasked padding would change every logit; its class token stays at position 0),
    so each row equals a forward of that sequence alone. A pad token inside a sequence (the
    perturbation's ``"replace"`` mode) is a real input, attended as any token. Caching, prefetching
    and the dry run are :class:`LabelScorer`'s.
    """

    def _label_logits(self, batch: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, attention_mask=mask).logits.float()[:, self.label_ids]   # [B, labels]


def score_example(scorer: LabelScorer, ids: torch.Tensor, relevance: torch.Tensor, positions: torch.Tensor,
                  target: int, pad_id: int, planted: torch.Tensor | None, *, perturbation: bool = True
                  ) -> dict[str, Any]:
    """Every metric of one explanation (see the module docstring); curves as lists for the plots.
    ``perturbation=False`` keeps only the localisation scores."""
    record: dict[str, Any] = {}
    if planted is not None and 0 < len(planted) < len(positions):
        record.update(metrics.localisation(relevance, positions, planted))
    if not perturbation:
        return record
    curves = {}
    for mode in ("delete", "replace"):
        for order, first in (("positive", True), ("negative", False)):
            curve = metrics.perturbation_curve(scorer, ids, relevance, positions, target, mode=mode, pad_id=pad_id,
                                               most_relevant_first=first)
            curves[f"{order}_{mode}"] = curve
            record[f"auc_{order}_{mode}"] = curve.auc("probability")
            record[f"auc_{order}_{mode}_accuracy"] = curve.auc("correct")
            record[f"curve_{order}_{mode}"] = [round(p, 5) for p in curve.probability]
            record[f"kept_{order}_{mode}"] = [bool(c) for c in curve.correct]
    record["dA_delete"] = metrics.delta_auc(curves["negative_delete"], curves["positive_delete"])
    record["dA_replace"] = metrics.delta_auc(curves["negative_replace"], curves["positive_replace"])
    eraser = metrics.eraser(scorer, ids, relevance, positions, target, mode="delete", pad_id=pad_id)
    record["comprehensiveness"] = eraser["comprehensiveness_mean"]
    record["sufficiency"] = eraser["sufficiency_mean"]
    for fraction, comp, suff in zip(eraser["fractions"], eraser["comprehensiveness"], eraser["sufficiency"]):
        record[f"comprehensiveness_{round(100 * fraction)}"] = comp
        record[f"sufficiency_{round(100 * fraction)}"] = suff
    return record


def run_model_task(model_dir: str | Path, examples: Sequence[BenchmarkExample], out_file: Path, *,
                   specs: Sequence[MethodSpec] | None = None, device: str = "cpu",
                   progress: Callable[[int, int], None] | None = None, time_limit: float | None = None,
                   model_name: str = "", task_name: str = "", perturbation: bool = True,
                   ablations: bool = True) -> dict[str, Any]:
    """Run every method on every example not yet in ``out_file``, appending one line per result.

    ``perturbation=False`` computes only the localisation scores (the ground-truth task);
    ``specs`` default to :func:`method_specs` of the loaded model (``ablations`` included or not).
    ``model_dir`` may hold a causal LM with a ``task.json`` (the zoo) or a sequence classifier (the
    pretrained reference, :mod:`.reference`).

    Example-major order: after an interruption the finished examples have every method, so the
    methods are always compared on the same examples. A method that raises (a model it refuses,
    e.g. LRP where no faithful rule exists) is dropped for this model and its error kept in
    ``<task>.failures.json`` beside the results, which the report lists. Returns counts and timings.
    """
    from ..explanations.api import explain
    from ..explanations.target import Contrast
    from ..loading import load_model
    from ..text import encode_text
    from .groundtruth import planted_token_positions
    from .report import read_failures

    loaded = load_model(model_dir, device=device)
    model = loaded.model
    labels = loaded.labels
    label_ids = [loaded.label_ids[name] for name in labels]
    pad_id = loaded.pad_token_id
    # a classifier's label ids are its class indices (``id2label``), scored from its own logits
    scorer = (ClassifierScorer if loaded.is_classifier else LabelScorer)(model, label_ids, pad_id)
    specs = list(specs) if specs is not None else method_specs(model, ablations=ablations)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    done = finished_keys(out_file)
    failures_file = out_file.with_suffix(".failures.json")
    failures = read_failures(out_file)  # those of this task's other shards too
    specs = [spec for spec in specs if spec.key not in failures]
    seconds: dict[str, float] = {spec.key: 0.0 for spec in specs}
    written, start = 0, time.perf_counter()
    with open(out_file, "a", encoding="utf-8") as handle:
        if out_file.stat().st_size and not out_file.read_bytes().endswith(b"\n"):
            handle.write("\n")  # after a torn last line, new records start on a line of their own
        for index, example in enumerate(examples):
            if time_limit is not None and time.perf_counter() - start > time_limit:
                break
            todo = [spec for spec in specs if (example.id, spec.key) not in done]
            if not todo:
                continue
            encoded = encode_text(loaded, example.text)
            ids = torch.tensor(encoded.ids)
            positions = torch.tensor([i for i, inside in enumerate(encoded.in_span) if inside])
            planted = None
            if example.planted:
                offsets = [o if o is not None else (0, 0) for o in encoded.offsets]
                planted = torch.tensor(planted_token_positions(offsets, example.planted), dtype=torch.long)
            with parallel_forms(model):
                probs = scorer([ids])[0].softmax(-1)
            predicted = int(probs.argmax())
            other = [label_ids[i] for i in range(len(label_ids)) if i != predicted]
            target = Contrast(label_ids[predicted], other)
            relevances, ticks = {}, {}
            for spec in list(todo):
                tick = time.perf_counter()
                # gradient and perturbation baselines only need the model's outputs: parallel scans
                # where available (same numbers); the matrix methods switch the Mamba scans themselves
                # (implicit_attention.scans) and LRP reads the stock modules
                try:
                    with parallel_forms(model, spec.method in PARALLEL_SAFE):
                        relevances[spec.key] = explain(model, ids[None].to(scorer.device), method=spec.method,
                                                       target=target, **spec.options)[0].detach().float().cpu()
                except Exception as error:  # a method that refuses this model: dropped, and said so
                    failures[spec.key] = f"{type(error).__name__}: {error}"
                    failures_file.write_text(json.dumps(failures, indent=1) + "\n")
                    todo.remove(spec)
                    specs.remove(spec)
                    continue
                ticks[spec.key] = time.perf_counter() - tick
            # a dry run collects every perturbed input of every method, scored in a few batches
            scorer.recording = []
            for spec in todo:
                score_example(scorer, ids, relevances[spec.key], positions, predicted, pad_id, planted,
                              perturbation=perturbation)
            recorded, scorer.recording = scorer.recording, None
            with parallel_forms(model):
                scorer.prefetch(recorded)
            for spec in todo:
                record = {"id": example.id, "method": spec.key, "model": model_name, "task": task_name,
                          "label": example.label, "predicted": predicted, "probability": float(probs[predicted]),
                          "tokens": len(positions), "seconds": round(ticks[spec.key], 4)}
                record.update(score_example(scorer, ids, relevances[spec.key], positions, predicted, pad_id,
                                            planted, perturbation=perturbation))
                seconds[spec.key] += ticks[spec.key]
                handle.write(json.dumps(record) + "\n")
                written += 1
            scorer.clear()
            handle.flush()
            if progress is not None:
                progress(index + 1, len(examples))
    return {"written": written, "seconds": round(time.perf_counter() - start, 1), "failures": failures,
            "seconds_per_method": {k: round(v, 2) for k, v in seconds.items()}}
