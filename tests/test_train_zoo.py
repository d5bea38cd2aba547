"""scripts/train_zoo.py's choice among fine-tuning seeds and their model soup, on a tiny run on the CPU."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent


def test_seeds_and_their_soup_are_chosen_on_validation(tmp_path):
    """Two fine-tuning seeds of one pre-trained GPT-2 and their uniform soup: the soup's weights are the seeds'
    mean, and the shipped model is whichever has the best validation accuracy (the soup only if strictly better),
    with every score recorded."""
    work = tmp_path / "work"
    (work / "tokenizer").mkdir(parents=True)
    shutil.copy(REPO / "zoo" / "tokenizer.json", work / "tokenizer" / "tokenizer.json")
    shutil.copy(REPO / "zoo" / "mamba" / "tokenizer_config.json", work / "tokenizer" / "tokenizer_config.json")
    corpus = tmp_path / "english.jsonl.gz"
    with gzip.open(corpus, "wt", encoding="utf-8") as handle:
        for k in range(40):
            handle.write(json.dumps({"source": "test", "text": f"the film number {k} was a quiet and honest story "
                                                               "about people who talk a lot"}) + "\n")
    command = [sys.executable, str(REPO / "scripts" / "train_zoo.py"), "--work", str(work), "--corpus", str(corpus),
               "--models", "gpt2", "--stages", "pretrain,sentiment", "--pretrain-steps", "2", "--pretrain-batch", "4",
               "--epochs", "1", "--limit", "48", "--finetune-seeds", "2", "--soup", "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    home = work / "gpt2"
    seeds = [load_file(home / f"sentiment-seed{seed}" / "model.safetensors") for seed in (0, 1)]
    soup = load_file(home / "sentiment-soup" / "model.safetensors")
    weight = next(key for key, value in soup.items() if value.is_floating_point() and value.dim() == 2)
    mean = (seeds[0][weight].float() + seeds[1][weight].float()) / 2
    assert not torch.equal(seeds[0][weight], seeds[1][weight])               # the seeds did differ
    torch.testing.assert_close(soup[weight].float(), mean, rtol=2e-3, atol=2e-3)   # float16 files

    shipped = json.loads((home / "sentiment" / "task.json").read_text())
    selection = shipped["seed_selection"]
    scores = {int(seed): score for seed, score in selection["validation_accuracy"].items()}
    soup_score = selection["soup_validation_accuracy"]
    best_seed = max(scores, key=lambda seed: (scores[seed], -seed))
    expected = "soup" if soup_score > scores[best_seed] else best_seed
    assert selection["chosen_seed"] == expected
    assert shipped["validation_accuracy"] == (soup_score if expected == "soup" else scores[best_seed])
    soup_task = json.loads((home / "sentiment-soup" / "task.json").read_text())
    assert len(soup_task["soup_of"]) == 2 and soup_task["training_time_seconds"] == round(
        sum(selection["training_time_seconds"].values()), 1)


def test_distillation_loss_on_hand_computed_cases():
    """T^2 KL(teacher_T || student_T) for a student at [0.5, 0.5] and a teacher at [0.8, 0.2]:
    T = 1: 0.8 ln(0.8 / 0.5) + 0.2 ln(0.2 / 0.5) = 0.19274;
    T = 2: the teacher softens to sqrt(p) normalised, [2/3, 1/3]; 4 (2/3 ln(4/3) + 1/3 ln(2/3)) = 0.22653."""
    from implicit_attention.benchmark.training import distillation_loss

    student = torch.zeros(3, 2)
    teacher = torch.tensor([[0.8, 0.2]] * 3)
    assert abs(float(distillation_loss(student, teacher, 1.0)) - 0.192745) < 1e-5
    assert abs(float(distillation_loss(student, teacher, 2.0)) - 0.226532) < 1e-5
    assert float(distillation_loss(torch.tensor([[1.3, -0.4]]), torch.tensor([[1.3, -0.4]]).softmax(-1), 2.0)) < 1e-6


def test_teacher_labels_belong_to_their_split(tmp_path):
    """A teacher file is read back for its own split, and refused for other examples or another label order."""
    from implicit_attention.benchmark.training import PromptTask, read_teacher_labels, split_digest

    task = PromptTask(name="toy", template="{text} is", label_names=("no", "yes"), label_words=(" no", " yes"),
                      splits={"train": [("a", 0), ("b", 1)]})
    record = {"task": "toy", "split": "train", "labels": ["no", "yes"], "examples_sha256": split_digest(task, "train"),
              "probabilities": [[0.9, 0.1], [0.2, 0.8]]}
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps(record))
    assert read_teacher_labels(path, task).tolist() == [[0.8999999761581421, 0.10000000149011612],
                                                         [0.20000000298023224, 0.800000011920929]]
    relabelled = PromptTask(name="toy", template="{text} is", label_names=("no", "yes"), label_words=(" no", " yes"),
                            splits={"train": [("a", 0), ("b", 0)]})
    with pytest.raises(ValueError, match="examples_sha256"):
        read_teacher_labels(path, relabelled)
    path.write_text(json.dumps({**record, "labels": ["yes", "no"]}))
    with pytest.raises(ValueError, match="labels"):
        read_teacher_labels(path, task)


def tiny_finetune(tmp_path, name: str, labels_flipped: bool, teacher: torch.Tensor | None, weight: float):
    """Fine-tune the shipped GPT-2 for a few steps on 64 sentences; its weights."""
    import dataclasses

    from implicit_attention.benchmark.tasks import sentiment_task
    from implicit_attention.benchmark.training import TaskSettings, train_task

    task = sentiment_task()
    train = task.splits["train"][:64]
    if labels_flipped:
        train = [(text, 1 - label) for text, label in train]
    task = dataclasses.replace(task, splits={"train": train, "validation": task.splits["validation"][:32],
                                             "test": task.splits["test"][:32]})
    settings = TaskSettings(epochs=1, batch_size=16, warmup=1, evals_per_epoch=1, distill_weight=weight)
    train_task("gpt2", task, REPO / "zoo" / "gpt2", tmp_path / name, settings, teacher=teacher, log=lambda line: None)
    return load_file(tmp_path / name / "model.safetensors")


def test_distillation_replaces_the_labels_by_the_teacher(tmp_path):
    """With weight 1 only the teacher teaches: flipping every true label changes nothing; with weight 0 the
    teacher is ignored; with weight 1 another teacher changes the weights."""
    generator = torch.Generator().manual_seed(0)
    teacher = torch.rand(64, 1, generator=generator)
    teacher = torch.cat([teacher, 1 - teacher], dim=1)
    as_is = tiny_finetune(tmp_path, "a", False, teacher, 1.0)
    flipped = tiny_finetune(tmp_path, "b", True, teacher, 1.0)
    other_teacher = tiny_finetune(tmp_path, "c", False, teacher.flip(1), 1.0)
    weight = next(key for key, value in as_is.items() if value.is_floating_point() and value.dim() == 2)
    assert torch.equal(as_is[weight], flipped[weight])
    assert not torch.equal(as_is[weight], other_teacher[weight])
    plain = tiny_finetune(tmp_path, "d", False, None, 0.0)
    ignored = tiny_finetune(tmp_path, "e", False, teacher, 0.0)
    assert torch.equal(plain[weight], ignored[weight]) and not torch.equal(plain[weight], as_is[weight])
    with pytest.raises(ValueError, match="teacher"):
        tiny_finetune(tmp_path, "f", False, None, 0.5)


def test_train_zoo_reads_the_teacher_for_the_sentiment_split_only(tmp_path):
    """train_zoo.py's options: a weight needs a teacher; the teacher's file is checked against the whole
    training split and cut to --limit; the ground-truth task and a zero weight get no teacher."""
    from implicit_attention.benchmark.tasks import sentiment_task
    from implicit_attention.benchmark.training import split_digest

    sys.path.insert(0, str(REPO / "scripts"))
    import train_zoo

    with pytest.raises(SystemExit):
        train_zoo.parse_args(["--distill-weight", "0.5"])
    task = sentiment_task()
    n = len(task.splits["train"])
    probs = [[k / n, 1 - k / n] for k in range(n)]
    path = tmp_path / "teacher.json"
    path.write_text(json.dumps({"task": "sentiment", "split": "train", "labels": list(task.label_names),
                                "examples_sha256": split_digest(task, "train"), "probabilities": probs}))
    args = train_zoo.parse_args(["--teacher", str(path), "--distill-weight", "0.5", "--limit", "10",
                                 "--stages", "pretrain,sentiment"])
    limited = train_zoo.load_tasks(args)["sentiment"]
    labels = train_zoo.teacher_labels(args, "sentiment", limited)
    assert labels.shape == (10, 2) and float(labels[3, 0]) == pytest.approx(3 / n)
    assert train_zoo.teacher_labels(args, "groundtruth", limited) is None
    settings = train_zoo.task_settings(args, "sentiment", 4)
    assert (settings.distill_weight, settings.distill_temperature, settings.seed) == (0.5, 2.0, 4)
    assert train_zoo.task_settings(args, "groundtruth", 4).distill_weight == 0.0


def test_exporting_some_models_updates_their_entries_and_keeps_the_others(tmp_path):
    """train_zoo.py --export with --models: the exported model's zoo.json entry is rewritten from its task.json
    (a distilled one noted in the table), every other entry is kept as it was, in the zoo's order."""
    sys.path.insert(0, str(REPO / "scripts"))
    import train_zoo

    export = tmp_path / "zoo"
    export.mkdir()
    kept = {name: json.loads((REPO / "zoo" / "zoo.json").read_text())[name] for name in ("mamba", "llama")}
    (export / "zoo.json").write_text(json.dumps({"llama": kept["llama"], "mamba": kept["mamba"]}))
    source = tmp_path / "work" / "gpt2" / "sentiment"
    source.mkdir(parents=True)
    for file in ("config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "task.json"):
        shutil.copy(REPO / "zoo" / "gpt2" / file, source / file)
    shutil.copy(REPO / "zoo" / "tokenizer.json", source / "tokenizer.json")
    task = json.loads((source / "task.json").read_text())
    task["settings"]["distill_weight"] = 0.25
    task.pop("seed_selection", None)
    (source / "task.json").write_text(json.dumps(task))
    args = train_zoo.parse_args(["--work", str(tmp_path / "work"), "--models", "gpt2", "--export", str(export)])
    assert train_zoo.export(args) == 0
    zoo = json.loads((export / "zoo.json").read_text())
    assert list(zoo) == ["mamba", "gpt2", "llama"] and zoo["mamba"] == kept["mamba"] and zoo["llama"] == kept["llama"]
    assert zoo["gpt2"]["test_accuracy"] == task["test_accuracy"] and zoo["gpt2"]["distill_weight"] == 0.25
    assert zoo["gpt2"]["finetune_seeds"] == 1
    assert "| GPT-2 | 0.99 M |" in (export / "README.md").read_text()
    assert "(distilled, weight 0.25) |" in (export / "README.md").read_text()
    assert (export / "gpt2" / "tokenizer.json").resolve() == (export / "tokenizer.json").resolve()
