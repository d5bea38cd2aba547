"""scripts/train_zoo.py's choice among fine-tuning seeds and their model soup, on a tiny run on the CPU."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

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
