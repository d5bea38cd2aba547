#!/usr/bin/env python
"""How long a small Llama takes to learn associative recall: the plateau behind issue 15's ICL target.

Each row holds ``--items`` items ``key, t_1 .. t_g, value, separator``: ``--keys`` random keys of the row,
each with its own random value (tokens of a ``--vocab``-token vocabulary), and ``g`` template tokens
(drawn per item from ``--gap MIN,MAX``; the template is the same within a row, as AMPLIFY's
``is an important clue to predict '`` is between a rationale's word and its label). The loss is on each
value whose key already came earlier in the row: the model must find the key's earlier item and copy
its value. With no gap this is plain associative recall, which one induction head solves; each
template token in between is one more step of the circuit that matching a query's words to an earlier
rationale needs. ``--ramp N`` widens the gap by one every ``N`` steps (a curriculum).

Prints one JSON line every ``--every`` steps (mean loss and accuracy of the values since the last one);
``--out`` keeps them. A model that only copies one of the row's values gets about a quarter right with 5
keys: the plateau before the recall circuit forms. With the defaults, on the project's 2-core CPU, a
2 x 128 Llama stayed there (22-26%) from step 300 to step 1,700, then reached 74% at step 3,000
(``docs/benchmark/amplify/recall-probe-cpu.json``; about 0.3 s a step).

Examples::

    python scripts/recall_probe.py --steps 3000                       # plain associative recall
    python scripts/recall_probe.py --gap 0,6 --layers 3 --ramp 100     # a gap curriculum
    python scripts/recall_probe.py --device cuda --steps 30000 --batch-size 128 --gap 0,8 --layers 4 --width 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

#: Token ids below this are never keys, values nor template tokens; ``SEPARATOR`` ends each item.
FIRST_FREE, SEPARATOR = 4, 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per step (default: %(default)s)")
    parser.add_argument("--items", type=int, default=20, help="items per row (default: %(default)s)")
    parser.add_argument("--keys", type=int, default=5, help="distinct keys per row (default: %(default)s)")
    parser.add_argument("--gap", default="0,0", metavar="MIN,MAX",
                        help="template tokens between a key and its value (default: %(default)s)")
    parser.add_argument("--ramp", type=int, default=0,
                        help="steps per widening of the largest gap by one, from MIN (0: MAX from the start)")
    parser.add_argument("--vocab", type=int, default=3072, help="vocabulary size (default: the zoo's, %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="Llama layers (default: %(default)s)")
    parser.add_argument("--width", type=int, default=128, help="Llama width (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--every", type=int, default=50, help="steps per printed line (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the rows (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="write the printed lines to this JSON file")
    args = parser.parse_args(argv)
    try:
        args.gap = tuple(int(part) for part in args.gap.split(","))
    except ValueError:
        parser.error(f"--gap takes MIN,MAX, got {args.gap!r}")
    if len(args.gap) != 2 or not 0 <= args.gap[0] <= args.gap[1]:
        parser.error(f"--gap needs 0 <= MIN <= MAX, got {args.gap}")
    for name in ("steps", "batch_size", "items", "keys", "layers", "width", "heads", "every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.vocab < FIRST_FREE + 2 * args.keys + args.gap[1]:
        parser.error("--vocab is too small for the keys, values and template of a row")
    if args.width % args.heads:
        parser.error("--width must be a multiple of --heads")
    return args


def recall_rows(generator: torch.Generator, rows: int, items: int, keys: int, gap: tuple[int, int],
                vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids [rows, T]`` (right-padded with ``SEPARATOR``), and the row ``[P]`` and position ``[P]`` of each
    token whose next token is the value of a key already seen in its row (the recall targets)."""
    sequences, where = [], []
    for r in range(rows):
        drawn = (FIRST_FREE + torch.randperm(vocab - FIRST_FREE, generator=generator)[:2 * keys + gap[1]]).tolist()
        key_ids, value_ids, template = drawn[:keys], drawn[keys:2 * keys], drawn[2 * keys:]
        sequence, seen = [], set()
        for _ in range(items):
            k = int(torch.randint(keys, (1,), generator=generator))
            g = int(torch.randint(gap[0], gap[1] + 1, (1,), generator=generator))
            sequence += [key_ids[k], *template[:g]]
            if k in seen:
                where.append((r, len(sequence) - 1))
            seen.add(k)
            sequence += [value_ids[k], SEPARATOR]
        sequences.append(sequence)
    ids = torch.full((rows, max(map(len, sequences))), SEPARATOR, dtype=torch.long)
    for r, sequence in enumerate(sequences):
        ids[r, :len(sequence)] = torch.tensor(sequence)
    targets = torch.tensor(where, dtype=torch.long).reshape(-1, 2)
    return ids, targets[:, 0], targets[:, 1]


def current_gap(args, step: int) -> tuple[int, int]:
    """The gap range at ``step``: ``--gap``, its maximum widened by one every ``--ramp`` steps from MIN."""
    low, high = args.gap
    return (low, min(high, low + step // args.ramp)) if args.ramp else (low, high)


def main(argv=None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         max_position_embeddings=max(1024, args.items * (args.gap[1] + 3)), tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(args.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(args.seed)
    history, losses, right, seen, began = [], [], 0, 0, time.perf_counter()
    for step in range(args.steps):
        gap = current_gap(args, step)
        ids, rows, positions = recall_rows(generator, args.batch_size, args.items, args.keys, gap, args.vocab)
        ids, rows, positions = ids.to(args.device), rows.to(args.device), positions.to(args.device)
        logits = model(input_ids=ids).logits[rows, positions].float()
        values = ids[rows, positions + 1]
        loss = torch.nn.functional.cross_entropy(logits, values)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        losses.append(loss.item())
        right += int((logits.argmax(-1) == values).sum())
        seen += len(values)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            record = {"step": step + 1, "gap": list(gap), "loss": round(sum(losses) / len(losses), 4),
                      "accuracy": round(right / max(seen, 1), 4), "seconds": round(time.perf_counter() - began, 1)}
            print(json.dumps(record), flush=True)
            history.append(record)
            losses, right, seen = [], 0, 0
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                        "history": history}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
