"""
What alttrain.keep_freed_memory() buys on CPU: the same training steps (SmolLM2-135M, plain LoRA, the quick
start's examples in length-grouped batches of 8) in two fresh processes, one with glibc's default (every block
over 32 MB gets its own mmap, unmapped when freed) and one after keep_freed_memory(). Prints seconds per step,
minor page faults and peak memory of each. (That the numbers stay the same is shown by whole runs, not here:
the quick start wrote a bit-identical adapter with and without it; two processes of this script differ in
the last digits of the loss even with the same setting.)

    python bench/keep_freed_memory.py                 # 2 warm-up + 8 timed steps in each process
Results: printed, and bench/results/keep_freed_memory.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import common as c

CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {bench!r})
import common as c
from common import at
keep, warmup, steps = {keep}, {warmup}, {steps}
ok = at.keep_freed_memory() if keep else False
args = at.parse_args(["--model", "smollm2-135m", "--no-quant", "--optim", "adamw", "--no-grad-ckpt", "--lr", "2e-3"])
path = c.model_path("smollm2-135m")
tok = at.load_tokenizer(path)
model = at.add_lora(at.load_model(path, quant=False), args, quant=False)
data = c.quickstart_examples(tok)
order = at.length_grouped_batches([len(ex["input_ids"]) for ex in data], 8, args.seed)[:warmup + steps]
opt = at.make_optimizer(model, args)
model.train()
torch.manual_seed(0)
for i, idx in enumerate(order):
    if i == warmup:
        t0, f0 = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = at.collate([data[j] for j in idx], tok.pad_token_id)
    loss = at.response_loss_sum(model, b) / int((b["labels"][:, 1:] != -100).sum())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps(dict(keep_freed_memory=keep, applied=ok, s_per_step=round((time.time() - t0) / steps, 3),
                      minor_faults=ru.ru_minflt - f0, peak_rss_gib=round(ru.ru_maxrss / 2**20, 2),
                      last_loss=loss.item())))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=8, help="timed steps")
    args = p.parse_args(argv)
    rows = []
    for keep in (False, True):
        code = CHILD.format(bench=str(c.ROOT / "bench"), keep=keep, warmup=args.warmup, steps=args.steps)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    print(f"s/step {rows[0]['s_per_step']} -> {rows[1]['s_per_step']} "
          f"({100 * (1 - rows[1]['s_per_step'] / rows[0]['s_per_step']):.0f}% less); page faults "
          f"{rows[0]['minor_faults']:,} -> {rows[1]['minor_faults']:,}")
    c.save("keep_freed_memory.json", dict(machine=c.machine(), warmup=args.warmup, steps=args.steps, runs=rows))


if __name__ == "__main__":
    main()
