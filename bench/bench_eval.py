"""
Evaluation speed: eval.py's batched generation against one prompt at a time, and the judges' verdicts/s.

Uses eval.py's own functions (generate_answers, judge_records) on the same prompts and model:
  generation   data/test_harmful.jsonl (first --n prompts), greedy, --max-new-tokens, at each --batch-sizes.
               Also counts how many answers are the same text as one-at-a-time generation: left padding must
               not change what a greedy model says (small numeric differences may flip a near-tie).
  judges       keywords (the offline heuristic) over the answers, repeated to time it; and a model judge
               through the Qwen3Guard path with --judge-model (default: SmolLM2-135M as a STAND-IN - Qwen3Guard
               cannot be downloaded here; it is 0.6B and stops after ~10 tokens, while a stand-in that is not
               a guard runs to the 48-token verdict limit, so its figure is about the cost, not the verdicts).

    python bench/bench_eval.py                                    # SmolLM2-135M, 16 prompts, 128 new tokens
    python bench/bench_eval.py --model tiny --max-new-tokens 32
Results: printed, and bench/results/eval.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import common as c
from common import at

import eval as ev


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="policy: alttrain alias or 'tiny'")
    p.add_argument("--n", type=int, default=16, help="prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="1 = one at a time (the baseline)")
    p.add_argument("--judge-model", default="smollm2-135m", help="model read through the Qwen3Guard judge path")
    p.add_argument("--judge-batch-sizes", type=int, nargs="+", default=[1, 8])
    args = p.parse_args(argv)

    path = c.model_path(args.model)
    tok = at.load_tokenizer(path)
    model = at.load_model(path, quant=False, allow_cpu=True)
    flags = lambda bs: ev.build_parser().parse_args(
        ["--model", path, "--limit", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
         "--batch-size", str(bs), "--judge", "qwen3guard", "--judge-model", c.model_path(args.judge_model)])
    items = ev.load_benchmark(str(c.ROOT / "data" / "test_harmful.jsonl"), flags(1))
    result = dict(machine=c.machine(), model=args.model, prompts=len(items), max_new_tokens=args.max_new_tokens,
                  generation={}, judges={})
    answers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for bs in sorted(set(args.batch_sizes)):
            t0 = time.time()
            recs = ev.generate_answers(model, tok, items, Path(tmp) / f"gen-{bs}.jsonl", flags(bs))
            dt = time.time() - t0
            answers[bs] = recs
            new = sum(r["new_tokens"] for r in recs)
            result["generation"][bs] = dict(seconds=round(dt, 2), answers_per_s=round(len(recs) / dt, 3),
                                            new_tokens_per_s=round(new / dt, 1), new_tokens=new)
        base = min(answers)
        for bs, recs in answers.items():
            g = result["generation"][bs]
            g["speedup_vs_batch_%d" % base] = round(g["answers_per_s"] / result["generation"][base]["answers_per_s"], 2)
            g["same_text_as_batch_%d" % base] = sum(a["output"] == b["output"] for a, b in zip(recs, answers[base]))
        del model

        # keywords: pure Python, so time many verdicts
        recs = answers[base]
        many = [dict(r, judges={}) for r in recs] * max(1, 5000 // len(recs))
        t0 = time.time()
        ev.judge_records(many, Path(tmp) / "kw.jsonl", ev.build_parser().parse_args(["--judge", "keywords"]))
        dt = time.time() - t0
        result["judges"]["keywords"] = dict(verdicts=len(many), seconds=round(dt, 3),
                                            verdicts_per_s=round(len(many) / dt))
        judge = ev.load_judge(flags(1))
        for jbs in sorted(set(args.judge_batch_sizes)):
            jargs = flags(1)
            jargs.judge_batch_size = jbs
            fresh = [dict(r, judges={}) for r in recs]
            t0 = time.time()
            ev.judge_records(fresh, Path(tmp) / f"judge-{jbs}.jsonl", jargs, judge)
            dt = time.time() - t0
            result["judges"][f"model judge ({args.judge_model}), batch {jbs}"] = dict(
                verdicts=len(fresh), seconds=round(dt, 2), verdicts_per_s=round(len(fresh) / dt, 3))

    print(f"\n{args.model}, {len(items)} prompts, greedy, {args.max_new_tokens} new tokens, "
          f"{result['machine']['cpu']} ({result['machine']['cores']} cores)")
    print("| generation | s | answers/s | new tokens/s | vs one at a time | same text as one at a time |")
    print("|---|---|---|---|---|---|")
    for bs, g in result["generation"].items():
        print(f"| batch {bs} | {g['seconds']:.1f} | {g['answers_per_s']:.2f} | {g['new_tokens_per_s']:.0f} | "
              f"{g['speedup_vs_batch_%d' % base]:.1f}x | {g['same_text_as_batch_%d' % base]}/{len(items)} |")
    print("\n| judge | verdicts | s | verdicts/s |\n|---|---|---|---|")
    for name, j in result["judges"].items():
        print(f"| {name} | {j['verdicts']} | {j['seconds']} | {j['verdicts_per_s']} |")
    c.save("eval.json", result)


if __name__ == "__main__":
    main()
