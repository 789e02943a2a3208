"""
Padding waste: the share of computed tokens that are padding, for each way of cutting examples into batches.

A batch is computed at the width of its longest example, so every shorter example pays for padding. Counted
here, without running a model (a batch of 8 costs 8 x its longest example):
  ours          alttrain.length_grouped_batches: shuffle, sort inside chunks of 64 batches, shuffle batches
  data order    consecutive examples as selected (alttrain.py selects the harmful ones, then the benign)
  random        a fresh random order every epoch: Trainer's default sampler, so TRL SFTTrainer's default
                (and alttrain.py --batching random)
  hf grouped    transformers' LengthGroupedSampler (train_sampling_strategy="group_by_length" in TRL/Trainer)
on two length distributions:
  quick start   data/train.jsonl as alttrain.py tokenizes it (159 examples, 96-179 tokens with SmolLM2's tokenizer)
  AltTrain-1K   like the paper's set: 900 harmful examples that stop and refuse (short), 100 benign ones that
                keep the original trace (1-4K tokens). Lengths are drawn at random from the ranges below (seeded):
                SafeChain's traces are not available offline, and only the lengths matter here.

    python bench/bench_padding.py                     # batch sizes 8 and 16, 5 epochs each
Results: printed as a table, and bench/results/padding.json.
"""
from __future__ import annotations

import argparse
import random

import common as c
from common import at

# AltTrain-1K-like lengths, in tokens: (prompt range, response range)
SHAPE = {"harmful": (900, (20, 120), (70, 160)),   # query; PU + HA + refusal + short answer + EOS
         "benign": (100, (20, 200), (1000, 4000))}  # query; the original trace + answer


def synthetic_1k(seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, (n, prompt, response) in SHAPE.items():
        for _ in range(n):
            p, r = rng.randint(*prompt), rng.randint(*response)
            rows.append(dict(length=p + r, supervised=r, label=label))
    return rows


def batchings(lengths: list[int], batch_size: int, epoch: int) -> dict[str, list[list[int]]]:
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler
    chunk = lambda order: [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    hf = LengthGroupedSampler(batch_size, lengths=lengths, generator=torch.Generator().manual_seed(epoch))
    return {"ours": at.length_grouped_batches(lengths, batch_size, seed=epoch),
            "data order": chunk(list(range(len(lengths)))),
            "random": at.random_batches(lengths, batch_size, seed=epoch),  # alttrain.py --batching random
            "hf grouped": chunk(list(hf))}


def waste(rows: list[dict], batches: list[list[int]]) -> dict:
    computed = sum(len(b) * max(rows[i]["length"] for i in b) for b in batches)
    real = sum(r["length"] for r in rows)
    supervised = sum(r["supervised"] for r in rows)
    return dict(computed=computed, padding=1 - real / computed, supervised=supervised / computed)


def measure(rows: list[dict], batch_sizes, epochs: int) -> dict:
    lengths = [r["length"] for r in rows]
    out = {}
    for bs in batch_sizes:
        per = {}
        for epoch in range(epochs):
            for name, batches in batchings(lengths, bs, epoch).items():
                per.setdefault(name, []).append(waste(rows, batches))
        out[f"batch {bs}"] = {name: {k: sum(w[k] for w in ws) / len(ws) for k in ws[0]} for name, ws in per.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer for the quick-start set (alias or 'tiny')")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    p.add_argument("--epochs", type=int, default=5, help="orders averaged over (seeds 0..N-1)")
    p.add_argument("--seed", type=int, default=1995, help="for the AltTrain-1K-like lengths")
    args = p.parse_args(argv)
    tok = at.load_tokenizer(c.model_path(args.tokenizer))
    quick = [dict(length=len(ex["input_ids"]), supervised=sum(l != -100 for l in ex["labels"][1:]), label=ex["label"])
             for ex in c.quickstart_examples(tok)]
    sets = {"quick start": quick, "AltTrain-1K-like": synthetic_1k(args.seed)}
    results = {name: measure(rows, args.batch_sizes, args.epochs) for name, rows in sets.items()}
    print("| set | batch | batching | padding share of computed tokens | supervised share | computed / ours |")
    print("|---|---|---|---|---|---|")
    for name, by_bs in results.items():
        for bs, by_batching in by_bs.items():
            ours = by_batching["ours"]["computed"]
            for batching, w in by_batching.items():
                print(f"| {name} | {bs.split()[1]} | {batching} | {100 * w['padding']:.1f}% | "
                      f"{100 * w['supervised']:.1f}% | {w['computed'] / ours:.2f}x |")
    c.save("padding.json", dict(machine=c.machine(), tokenizer=args.tokenizer, epochs=args.epochs,
                                synthetic_shape=SHAPE, results=results))


if __name__ == "__main__":
    main()
