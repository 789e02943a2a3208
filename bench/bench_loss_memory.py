"""
Peak memory of one training step with the loss in chunks (--loss-chunk, the default 1024) and without (0), on
CPU, at Llama-3's vocabulary (128,256) and long sequences, beside support/memory.py's estimate for the same shapes.

    python bench/bench_loss_memory.py                         # 2 x 2048 tokens, 3/4 supervised; ~2 min
    python bench/bench_loss_memory.py --batch 1 --width 4096

Each setting runs in a fresh process (a small Llama: 2 layers, 256 wide, vocabulary 128,256; LoRA r=16 on all
projections; fp32; no checkpointing), with glibc's mmap threshold fixed so that freed tensors leave the
resident set, and the peak is the step's own: the growth of VmHWM over the resident set before the step.
A benchmark, not a test: prints a table and writes bench/results/bench_loss_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common as c

CHILD = r"""
import gc, json, sys, time, torch
sys.path.insert(0, {root!r})
import alttrain as at
from support import memory
from transformers import LlamaConfig, LlamaForCausalLM
chunk, batch, width = {chunk}, {batch}, {width}
cfg = LlamaConfig(vocab_size=128256, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
args = at.build_parser().parse_args(["--no-grad-ckpt", "--loss-chunk", str(chunk)])
torch.manual_seed(0)  # the same model and batch in every process
model = at.add_lora(LlamaForCausalLM(cfg), args, quant=False)
ids = torch.randint(0, cfg.vocab_size, (batch, width)); labels = ids.clone(); labels[:, : width // 4] = -100
rss = lambda f: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f))
gc.collect(); open("/proc/self/clear_refs", "w").write("5"); base = rss("VmRSS:")
t0 = time.time()
loss = at.response_loss_sum(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels), chunk)
(loss / 1e3).backward()
seconds = time.time() - t0
sup = int((labels[:, 1:] != -100).sum())
est = memory.training(cfg, quant=False, dtype_bytes=4, lora_r=16, lora_targets=args.lora_targets.split(","),
                      lora_layers=None, optim="adamw", micro_batch=batch, width=width, supervised=sup,
                      grad_ckpt=False, cuda=False, loss_chunk=chunk)
grad = sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None)
print(json.dumps(dict(chunk=chunk, supervised=sup, peak_gib=(rss("VmHWM:") - base) / 2**30,
                      estimate_gib=(est["parts"]["activations"] + est["parts"]["logits"]) / 2**30,
                      logits_estimate_gib=est["parts"]["logits"] / 2**30, seconds=seconds,
                      loss=loss.item(), grad_abs_sum=grad)))
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    a = p.parse_args(argv)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(c.ROOT)}
    rows = []
    for chunk in a.chunks:
        code = CHILD.format(root=str(c.ROOT), chunk=chunk, batch=a.batch, width=a.width)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{a.batch} x {a.width} tokens, {rows[0]['supervised']} supervised, vocabulary 128,256, fp32, CPU\n")
    print("| --loss-chunk | peak GiB (measured) | estimate GiB (activations + logits) | estimate / peak | s | loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['chunk'] or 'off'} | {r['peak_gib']:.2f} | {r['estimate_gib']:.2f} | "
              f"{r['estimate_gib'] / r['peak_gib']:.2f} | {r['seconds']:.1f} | {r['loss']:.4f} |")
    c.save("bench_loss_memory.json", dict(machine=c.machine(), batch=a.batch, width=a.width, rows=rows))


if __name__ == "__main__":
    main()
