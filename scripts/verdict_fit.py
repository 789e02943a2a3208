"""
Does a trained model fit its own training verdicts? For every training example of a finished alttrain.py run
that has an assessment (HA), feed the example as it was trained (prompt, then the response up to where the HA
sentence starts: PU), and check whether the model's greedy next token is the HA's first token - the token that
carries the verdict when, as in data/train.jsonl, harmful and benign assessments open differently ("But wait"
/ "This is"). One forward pass per example, no generation.

That first measure is teacher-forced: the model reads the PU *as written in the data*, and a PU written
to interpret the request ("the user wants to inflate an air mattress", "the user wants sexual content
involving an animal") already carries most of the verdict. So it is measured a second way, as at inference:
for a sample of the training prompts the model writes its own PU and assessment (greedy, 64 new tokens), and
the assessment's verdict, read as eval.py reads it, is compared with the label. A run that gets the first
measure right and the second wrong leans on the written PU; one that gets the second right and still
misjudges held-out prompts does not generalise. Used to see what --ha-weight and the structure change (README).

    python scripts/verdict_fit.py out/quickstart/run            # the run's own alttrain_data.jsonl
    python scripts/verdict_fit.py out/quickstart/run --own-pu 0 # teacher-forced only (one forward pass each)
Results: printed, and bench/results/verdict_fit.json (one entry per run folder).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py: models, machine facts
import common as c  # noqa: E402
from common import at


def verdict_hits(model, tok, examples: list[dict], system_prompt: str | None = None) -> dict[str, list[bool]]:
    """label -> one bool per example with an HA: is the greedy token before the HA its first token?
    `system_prompt`: the run's own (--system-prompt), so each example is encoded as it was trained."""
    hits: dict[str, list[bool]] = {}
    with torch.no_grad():
        for ex in tqdm(examples, desc="verdicts", unit="example"):
            if not ex.get("ha"):
                continue
            # weights mark the HA's tokens (any weight but 1 does); the first marked one opens it
            enc = at.encode_example(tok, ex["query"], ex["response"], system_prompt, ha=ex["ha"], ha_weight=2.0)
            first = enc["weights"].index(2.0)
            ids = torch.tensor([enc["input_ids"][:first]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
            hits.setdefault(ex["label"], []).append(int(logits.argmax()) == enc["input_ids"][first])
    return hits


def own_pu_hits(model, tok, examples: list[dict], n: int, seed: int, system_prompt: str | None = None,
                batch_size: int = 40) -> dict[str, list[bool]]:
    """label -> one bool per sampled example (up to `n` a label, drawn with `seed`): does the assessment the
    model writes after its *own* PU agree with the label? Read as eval.py reads it for "HA agrees with the
    label" (split_output, first_assessment); no assessment counts as wrong."""
    # eval.py's own output parsing, so this measure and eval.py's agree by construction
    from support.records import split_output
    from support.structure import first_assessment
    rng = random.Random(seed)
    chosen = []
    for label in ("harmful", "benign"):
        pool = [ex for ex in examples if ex.get("ha") and ex["label"] == label]
        chosen += rng.sample(pool, min(n, len(pool)))
    prompts = [at.render_prompt(tok, ex["query"], system_prompt) for ex in chosen]
    outs = at.generate_all(model, tok, prompts, 64, batch_size, "own PU + HA")
    hits: dict[str, list[bool]] = {}
    for ex, prompt, (text, _, _) in zip(chosen, prompts, outs):
        reasoning, _, _ = split_output(text, at.template_opens_think(prompt))
        hits.setdefault(ex["label"], []).append(first_assessment(reasoning) == ex["label"])
    return hits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("run", help="a finished alttrain.py --out folder")
    p.add_argument("--own-pu", type=int, default=60,
                   help="training prompts a label for the own-PU measure (0: skip it)")
    p.add_argument("--seed", type=int, default=7, help="which training prompts the own-PU measure samples")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = json.loads((run / "alttrain_config.json").read_text())
    if not cfg.get("finished") or not (run / "adapter_model.safetensors").exists():
        raise SystemExit(f"{run}: not a finished alttrain.py run")
    from peft import PeftModel
    tok = at.load_tokenizer(str(run))
    base = at.load_model(cfg["base_model"], quant=False, allow_cpu=True)
    model = PeftModel.from_pretrained(base, str(run)).eval()
    examples = [json.loads(l) for l in open(run / at.DATA_NAME, encoding="utf-8")]
    hits = verdict_hits(model, tok, examples, cfg["args"].get("system_prompt"))
    result = {label: dict(n=len(h), right_first_token_pct=round(100 * sum(h) / len(h), 1)) for label, h in hits.items()}
    for label, r in result.items():
        print(f"{label:8s} n={r['n']:4d}  greedy token = the HA's first token (written PU): {r['right_first_token_pct']}%")
    if args.own_pu:
        own = own_pu_hits(model, tok, examples, args.own_pu, args.seed, cfg["args"].get("system_prompt"))
        for label, h in own.items():
            result[label].update(own_pu_n=len(h), own_pu_right_pct=round(100 * sum(h) / len(h), 1))
            print(f"{label:8s} n={len(h):4d}  the assessment after its own PU agrees with the label: "
                  f"{result[label]['own_pu_right_pct']}%")
    out = c.RESULTS / "verdict_fit.json"
    saved = json.loads(out.read_text()) if out.exists() else {}
    saved[os.path.normpath(args.run)] = dict(result=result, ha_weight=cfg["args"].get("ha_weight", 1.0),
                                            seed=cfg["args"]["seed"], own_pu_seed=args.seed if args.own_pu else None,
                                            machine=c.machine())
    c.save(out.name, saved)


if __name__ == "__main__":
    main()
