"""
fp32 against bf16 on the machine it runs on (CPU or GPU): what `--dtype auto` would pick and why, the machine's
matmul peak in each dtype, and how close alttrain.py's training step and eval.py's generation come to it.

    python bench/bench_dtype.py                       # SmolLM2-135M (offline), ~10 min on 2 cores
    python bench/bench_dtype.py --model tiny --steps 4

  matmul       best of 5: (4096 x 576) @ (576 x 576), a SmolLM2 projection over a batch of tokens, and 2048^3
  train        alttrain.train itself on the quick start's examples (plain LoRA r=16 on all projections, batch 8,
               no checkpointing, AdamW, as quickstart.sh): `--warmup` untimed steps, then `--steps` timed;
               fp32 = fp32 weights, no autocast; bf16 = bf16 base weights, forward under torch.autocast
  generate     eval.py's batched greedy generation: 40 held-out harmful prompts x 160 new tokens (the quick
               start's batch), fp32 weights vs bf16 weights; how many answers are the same text in both
  % of peak    achieved matmul GFLOP/s (a FLOP count of the linear layers and the LM head, approximate)
               over the measured peak of the larger matmul in the same dtype

Prints a table and writes bench/results/bench_dtype.json. A benchmark, not a test: numbers move with the
machine and whatever else it is doing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

import common as c
from common import at

from support.chat import generate_batch
from support.machine import compute_dtype, dtype_name, native_bf16


def matmul_gflops(dtype: torch.dtype, m: int, k: int, n: int, repeat: int = 5) -> float:
    dev = at.device()
    a, b = torch.randn(m, k, device=dev).to(dtype), torch.randn(k, n, device=dev).to(dtype)
    a @ b  # warm-up (kernel selection, page faults)
    best = float("inf")
    for _ in range(repeat):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if dev == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def linear_params(config) -> int:
    """Weights of the decoder's linear projections (what every token multiplies through)."""
    from support import memory
    return memory.dims(config)["L"] * sum(i * o for i, o in memory.linear_shapes(config).values())


def bench_train(model_name: str, dtype: torch.dtype, warmup: int, steps: int) -> dict:
    path = c.model_path(model_name)
    tok = at.load_tokenizer(path)
    data = c.quickstart_examples(tok)
    data = [{k: v for k, v in ex.items() if k != "label"} for ex in data]
    with tempfile.TemporaryDirectory() as out:
        args = at.parse_args(["--model", path, "--no-quant", "--optim", "adamw", "--no-grad-ckpt", "--lr", "2e-3",
                              "--batch-size", "8", "--epochs", "1", "--halt-after", str(warmup + steps),
                              "--save-every", "100000", "--out", out])
        model = at.add_lora(at.load_model(path, quant=False, dtype=dtype), args, quant=False)
        torch.manual_seed(args.seed)
        at.train(args, model, tok, data, c.Path(out), micro=8, dtype=dtype)
        log = [json.loads(l) for l in open(c.Path(out) / at.LOG_NAME)][warmup:]
    seconds = log[-1]["elapsed_s"] - (log[0]["elapsed_s"] - log[0]["tokens"] / log[0]["tok_per_s"])
    tokens = sum(r["tokens"] for r in log)
    supervised = sum(r["supervised_tokens"] for r in log)
    config = at.load_config(path)
    # forward 2 FLOPs per weight and token, backward 2 more (input gradients; the frozen weights get none);
    # the LM head at supervised positions only, forward and backward
    flops = 4 * linear_params(config) * tokens + 4 * config.vocab_size * config.hidden_size * supervised
    return dict(s_per_step=round(seconds / len(log), 3), tokens_per_s=round(tokens / seconds, 1),
                gflops=round(flops / seconds / 1e9, 1), last_loss=log[-1]["loss"])


def bench_generate(model_name: str, dtype: torch.dtype, n: int, max_new: int) -> dict:
    path = c.model_path(model_name)
    tok = at.load_tokenizer(path)
    prompts = [json.loads(l)["prompt"] for l in open(c.ROOT / "data" / "test_harmful.jsonl")][:n]
    ids = [at.encode_prompt(tok, at.render_prompt(tok, p)) for p in prompts]
    model = at.load_model(path, quant=False, dtype=dtype)
    model.eval()
    generate_batch(model, tok, ids[:2], 4)  # warm-up
    t0 = time.perf_counter()
    outs = generate_batch(model, tok, ids, max_new)
    seconds = time.perf_counter() - t0
    new = sum(k for _, k, _ in outs)
    flops = 2 * linear_params(at.load_config(path)) * new  # decoding: the weights once per new token
    return dict(seconds=round(seconds, 2), new_tokens_per_s=round(new / seconds, 1), gflops=round(flops / seconds / 1e9, 1),
                texts=[t for t, _, _ in outs])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m' (offline) or 'tiny'")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=8, help="timed training steps")
    p.add_argument("--prompts", type=int, default=40, help="prompts in the generation batch")
    p.add_argument("--max-new-tokens", type=int, default=160)
    a = p.parse_args(argv)
    dev = at.device()
    if dev == "cpu":
        at.keep_freed_memory()  # as alttrain.py does on CPU
    auto, why = compute_dtype("auto", dev)
    caps = dict(device=dev, native_bf16=native_bf16(dev), auto=dtype_name(auto), auto_reason=why)
    if dev == "cpu":
        caps.update(avx512_bf16=torch.cpu._is_avx512_bf16_supported(), amx=torch.cpu._is_amx_tile_supported())
    print(json.dumps(caps))
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = dtype_name(dtype)
        row = dict(matmul_4096x576x576=round(matmul_gflops(dtype, 4096, 576, 576), 1),
                   matmul_2048cubed=round(matmul_gflops(dtype, 2048, 2048, 2048), 1))
        print(name, row, flush=True)
        row["train"] = bench_train(a.model, dtype, a.warmup, a.steps)
        print(name, "train", row["train"], flush=True)
        row["generate"] = bench_generate(a.model, dtype, a.prompts, a.max_new_tokens)
        print(name, "generate", {k: v for k, v in row["generate"].items() if k != "texts"}, flush=True)
        rows[name] = row
    same = sum(x == y for x, y in zip(rows["fp32"]["generate"].pop("texts"), rows["bf16"]["generate"].pop("texts")))
    peak = {k: max(r["matmul_4096x576x576"], r["matmul_2048cubed"]) for k, r in rows.items()}
    print(f"\n{a.model} on {c.machine()['cpu']} ({dev}); --dtype auto -> {caps['auto']}: {why}\n")
    print("| | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    line = lambda label, f, fmt="{:.1f}": print(f"| {label} | {fmt.format(f(rows['fp32']))} | {fmt.format(f(rows['bf16']))} | "
                                                f"{f(rows['bf16']) / f(rows['fp32']):.2f}x |")
    line("matmul 4096x576 @ 576x576, GFLOP/s", lambda r: r["matmul_4096x576x576"])
    line("matmul 2048^3, GFLOP/s", lambda r: r["matmul_2048cubed"])
    line("training step, s", lambda r: r["train"]["s_per_step"], "{:.2f}")
    line("training, tokens/s", lambda r: r["train"]["tokens_per_s"])
    line("generation, new tokens/s", lambda r: r["generate"]["new_tokens_per_s"])
    for k in ("fp32", "bf16"):
        rows[k]["train"]["pct_of_peak"] = round(100 * rows[k]["train"]["gflops"] / peak[k], 1)
        rows[k]["generate"]["pct_of_peak"] = round(100 * rows[k]["generate"]["gflops"] / peak[k], 1)
    print(f"| training, % of the matmul peak | {rows['fp32']['train']['pct_of_peak']} | {rows['bf16']['train']['pct_of_peak']} | |")
    print(f"| generation, % of the matmul peak | {rows['fp32']['generate']['pct_of_peak']} | "
          f"{rows['bf16']['generate']['pct_of_peak']} | |")
    print(f"\ngeneration: {same}/{a.prompts} answers are the same text in fp32 and bf16 (greedy; bf16 rounds differently)")
    c.save("bench_dtype.json", dict(machine=c.machine(), capability=caps, model=a.model, warmup=a.warmup, steps=a.steps,
                                    prompts=a.prompts, max_new_tokens=a.max_new_tokens, rows=rows, same_answers=same))


if __name__ == "__main__":
    main()
