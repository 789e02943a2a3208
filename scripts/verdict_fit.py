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
misjudges held-out prompts does not generalise. Used to see what --ha-weight and the structure change (results/recipe_sweep.md).

    python scripts/verdict_fit.py out/quickstart/run            # the run's own alttrain_data.jsonl
    python scripts/verdict_fit.py out/quickstart/run --own-pu 0 # teacher-forced only (one forward pass each)
Results: printed, and written to <run>/verdict_fit.json, or to --out FILE, which keeps one entry per run folder
(so one file can gather several runs). bench/results/verdict_fit.json is the record of the runs of
results/recipe_sweep.md (2026-11-23); this script no longer writes there.
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
from support.files import UserError, cli, read_json  # noqa: E402


def device_of(model) -> torch.device:
    """Where the model's weights are: inputs must be built there (a CUDA model given CPU ids fails)."""
    device = getattr(model, "device", None)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.device(device)


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
            ids = torch.tensor([enc["input_ids"][:first]], device=device_of(model))  # where the model is (CUDA)
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
    p.add_argument("--out", default=None,
                   help="JSON file the result is added to, one entry per run folder (default: <run>/verdict_fit.json)")
    return cli("verdict_fit.py", p, measure, argv)  # a mistake in the input: one line, exit code 2


def measure(args):
    run = Path(args.run)
    if not (run / "alttrain_config.json").exists():
        raise UserError(f"{run}: no alttrain_config.json; is this an output folder of alttrain.py?")
    cfg = read_json(run / "alttrain_config.json")
    if not isinstance(cfg, dict) or not cfg.get("finished") or not (run / "adapter_model.safetensors").exists():
        raise UserError(f"{run}: not a finished alttrain.py run")
    out = Path(args.out) if args.out else run / "verdict_fit.json"
    if out.is_dir():
        raise UserError(f"--out {out}: a folder; name a .json file")
    saved = read_json(out, "--out") if out.exists() else {}  # a damaged file is an error, never overwritten
    if not isinstance(saved, dict):
        raise UserError(f"--out {out}: not a file of verdict_fit.py (a JSON object of run folders)")
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
    saved[os.path.normpath(args.run)] = dict(result=result, ha_weight=cfg["args"].get("ha_weight", 1.0),
                                            seed=cfg["args"]["seed"], own_pu_seed=args.seed if args.own_pu else None,
                                            machine=c.machine())
    out.parent.mkdir(parents=True, exist_ok=True)
    at.atomic_write(out, json.dumps(saved, indent=2))
    print(f"-> {out}")


if __name__ == "__main__":
    sys.exit(main())
