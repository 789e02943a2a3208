"""Memory checks: refuse a run that cannot fit before loading anything (the estimates are in support/memory.py)."""
from __future__ import annotations

import math

import torch

from . import distributed as dist, memory
from .files import UserError
from .machine import attention_for, compute_dtype, device, pad_multiple, round_up


# =====================================================================================================
# 5. Memory checks: refuse a run that cannot fit before loading anything (estimates in support/memory.py)
# =====================================================================================================
def planned_precision(args) -> tuple[bool, torch.dtype, str]:
    """(plan for CUDA?, compute dtype, why) before anything is loaded. --gpu-memory-gib on a machine without
    CUDA plans for a GPU that is not here (only with --dry-run), assumed to support bf16 (Ampere or newer).
    A run's precision belongs to the run: --resume under --dtype auto continues in the precision the run
    recorded (its config's `dtype`), whatever this machine would choose today; an explicit --dtype is
    checked against the record later (support/runs.py, check_resume_matches)."""
    planned_gpu = args.gpu_memory_gib is not None and device() != "cuda"
    if planned_gpu and not args.dry_run:
        raise UserError("--gpu-memory-gib without a CUDA GPU only plans (add --dry-run); this machine would train on CPU")
    cuda = device() == "cuda" or planned_gpu
    if planned_gpu and args.dtype == "auto":
        return cuda, torch.bfloat16, "bf16 (--dtype auto, planned for a GPU with bf16: Ampere or newer, e.g. A6000)"
    recorded = recorded_precision(args) if args.dtype == "auto" and getattr(args, "resume", False) else None
    if recorded is not None:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[recorded]
        note = "" if dtype == compute_dtype("auto", "cuda" if cuda else "cpu")[0] else \
            f"; here --dtype auto would pick {'fp32' if recorded == 'bf16' else 'bf16'}, the run keeps its own"
        return cuda, dtype, f"{recorded} (--dtype auto, --resume: the run in {args.out} computes in {recorded}{note})"
    return (cuda, *compute_dtype(args.dtype, "cuda" if cuda else "cpu"))


def recorded_precision(args) -> str | None:
    """The compute dtype ('bf16' or 'fp32') the run in --out recorded ('fp32' for a config of older code, which
    recorded none and computed in fp32, as check_resume_matches assumes), or None without a readable run config.
    Read by rank 0, the one process with the run folder, and sent to all."""
    from pathlib import Path
    from .runs import CONFIG_NAME
    found = None
    if dist.is_main():
        try:
            import json
            found = json.loads((Path(args.out) / CONFIG_NAME).read_text()).get("dtype", "fp32")
        except (OSError, ValueError, AttributeError):
            found = None  # no run or a damaged config: prepare_out_dir says so, with the fix
    found = dist.broadcast(found)
    return found if found in ("bf16", "fp32") else None


def check_generation_memory(args, config, quant: bool, dtype_bytes: int, cuda: bool, longest_prompt: int):
    """alttrain.py's self-traces and assessments: refuse before the model is loaded if they cannot fit."""
    est = memory.generation(config, quant=quant, dtype_bytes=dtype_bytes, batch=args.gen_batch_size,
                            prompt_len=longest_prompt + 256, max_new=max(args.self_trace_tokens, 64), cuda=cuda)
    check_memory(args, f"self-traces and assessments (batch {args.gen_batch_size})", est,
                 "try a smaller --gen-batch-size or --self-trace-tokens")


def auto_batch(args, config, quant: bool, dtype_bytes: int, prompt_len: int, max_new: int, n: int, cuda: bool,
               most: int, cpu: int, flag: str) -> int:
    """eval.py's `auto` batch size: on a GPU the largest batch (up to `most`, and no more than the `n` prompts)
    whose generation estimate fits the free memory; on CPU `cpu`. Printed with the reason."""
    if not cuda:
        batch, why = min(cpu, n), f"on CPU, {cpu}"
    else:
        free = memory_free(args, cuda)
        fits = lambda b: free is None or memory.generation(config, quant=quant, dtype_bytes=dtype_bytes, batch=b,
                                                           prompt_len=prompt_len, max_new=max_new, cuda=cuda)["total"] <= free
        batch = max([b for b in range(1, min(most, n) + 1) if fits(b)] or [1])
        why = (f"the largest that the generation plan fits in {free / memory.GiB:.1f} GiB" if free is not None else
               "free memory unknown") + f" ({prompt_len} + {max_new} tokens; at most {most})"
    print(f"{flag} auto: {batch} ({why})")
    return batch


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
                           attention=attention_for(getattr(args, "attention", "sdpa"), "cuda" if cuda else "cpu", width))


PLAN_LEN = 4096  # before the data is read and without --max-len, the plan shows examples of this length (a reference)


def plan_training(args, config, quant: bool, dtype_bytes: int, cuda: bool, data: list[dict] | None = None,
                  already_loaded: int = 0) -> int:
    """The training memory plan: print each term and pick the micro-batch. Returns the micro-batch size: how many
    examples of the longest length one forward pass holds. The loop packs a step's examples by that many tokens
    (micro x the longest width): the longest example alone if need be, shorter ones together.

    Without `data` (before anything is loaded or downloaded) it plans for examples of --max-len tokens, every
    token supervised; without --max-len (the default: every example trains) for examples of PLAN_LEN tokens, as a
    reference, and it refuses only a model that cannot fit at all. With `data` (after tokenisation) it plans for
    the real lengths, and refuses an example too long to train even alone, saying how many there are and which
    flag leaves them out or cuts them. A micro-batch only splits a step (same examples, same update), so without
    --micro-batch-size the fewest micro-batches that fit are chosen. `already_loaded`: bytes of weights in memory already
    (not free, and not needed again). Under torchrun the plan is per rank: each trains its share of a step's
    batch, and every rank plans for the rank with the least memory (the same micro-batches everywhere)."""
    batch, ranks = math.ceil(args.batch_size / dist.world()), dist.world()  # one process: the whole batch
    if ranks > 1 and (args.micro_batch_size or 0) > batch:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is more than each of the {ranks} processes' share "
                        f"of --batch-size {args.batch_size} ({batch}): some would idle; pass at most {batch}")
    pad = pad_multiple("cuda" if cuda else "cpu", torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    if data is None:
        length = args.max_len or PLAN_LEN
        width = round_up(length, pad)  # as the loop pads it (collate)
        sup = [length] * batch
        what = (f"the longest examples --max-len allows ({length} tokens each)" if args.max_len else
                f"examples of {length} tokens (no --max-len: a reference; the real lengths decide after tokenisation)")
    else:
        longest = max(len(ex["input_ids"]) for ex in data)
        width = round_up(longest, pad)
        sup = sorted((sum(l != -100 for l in ex["labels"][1:]) for ex in data), reverse=True)
        what = f"the data's real lengths (longest {longest} tokens" + (f", padded to {width})" if width > longest else ")")
    free = memory_free(args, cuda)
    room = float("inf") if free is None else free + already_loaded
    free, room = dist.smallest(free), dist.smallest(room)  # torchrun: the tightest rank decides, for every rank
    est = {m: training_estimate(args, config, quant, dtype_bytes, cuda, width, sup, m)
           for m in range(batch, 0, -1)}
    fitting = [m for m, e in est.items() if e["total"] <= room]
    micro = args.micro_batch_size or 1
    if fitting and not args.micro_batch_size:  # as few micro-batches as fit, of equal size (7 fits 8: two of 4):
        micro = math.ceil(batch / math.ceil(batch / fitting[0]))  # as many passes, and the lowest peak
    where = "cuda" if cuda else "cpu"
    free_txt = "unknown" if free is None else f"{free / memory.GiB:.1f} GiB" + (
        " (--gpu-memory-gib)" if getattr(args, "gpu_memory_gib", None) else f" free on {where}")
    chosen = "" if args.micro_batch_size else " (auto: fewest micro-batches that fit)" if fitting else " (nothing fits)"
    print(f"memory plan for training, {what}; {free_txt}")
    share = f" (each of {ranks} processes' share of {args.batch_size})" if ranks > 1 else ""
    packing = "" if args.micro_batch_size or micro >= batch else \
        f"; shorter examples share one, up to {micro * width} tokens"
    print(f"  micro-batch {micro} of batch {batch}{share}{chosen}: at most {math.ceil(batch / micro)} "
          f"micro-batch(es) a step{' per process' if ranks > 1 else ''}, effective batch {args.batch_size}{packing}")
    print(f"  needs {memory.describe(est[min(micro, batch)])}" + (" per process" if ranks > 1 else ""))
    print("  by micro-batch: " + ", ".join(f"{m}: {e['total'] / memory.GiB:.1f}" for m, e in est.items()) + " GiB")
    need = est[min(micro, batch)]["total"]
    if need <= room or args.skip_memory_check:
        return micro
    bare = training_estimate(args, config, quant, dtype_bytes, cuda, pad, [1], 1)["total"] <= room  # the model alone
    if data is None and (fitting or (bare and not args.max_len)):
        # before the real lengths are known, refuse only what no example could fit
        print(f"  note: micro-batch {micro} would not fit examples this long; checked again after tokenisation")
        return micro
    if not bare:
        fix = "the model alone does not fit: " + ("drop --no-quant (4-bit weights), " if not quant else "") + \
              "use a GPU with more memory or a smaller model"
    elif fitting:
        fix = (f"--micro-batch-size {fitting[0]} fits (the same training, only split); continue this run with "
               f"--resume --micro-batch-size {fitting[0]}, or leave the flag out to have it chosen")
    elif data is not None:
        fits = longest_that_fits(args, config, quant, dtype_bytes, cuda, room, pad)
        lengths = [len(ex["input_ids"]) for ex in data]
        over = sum(n > fits for n in lengths)
        fix = (f"{over} of {len(data)} examples are longer than the {fits} tokens one example may have here "
               f"(longest {max(lengths)}): pass --max-len {fits} to leave them out, or --max-len {fits} --truncate "
               "to cut them (a refused run continues with --resume and the flag)" +
               ("" if quant else "; or drop --no-quant (4-bit weights)") + "; or use a GPU with more memory")
    elif not quant:
        fix = "drop --no-quant (4-bit weights)"
    else:
        fix = "use a GPU with more memory, a smaller --max-len or --loss-chunk, or a smaller model"
    raise UserError(f"training (micro-batch {micro}) needs ~{(need - already_loaded) / memory.GiB:.1f} GiB and "
                    f"{free_txt}: {fix} (or --skip-memory-check to try anyway)")


def longest_that_fits(args, config, quant: bool, dtype_bytes: int, cuda: bool, room: float, pad: int) -> int:
    """The longest example (tokens, every one supervised) that fits alone in `room` bytes: 0 if none does."""
    fits = lambda n: training_estimate(args, config, quant, dtype_bytes, cuda, round_up(n, pad), [n], 1)["total"] <= room
    lo, hi = 0, 1
    while fits(hi) and hi < 1 << 24:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def length_report(lengths: list[int], bounds=(4096, 8192, 16384)) -> str:
    """One line about the examples' lengths (tokens): median, 90th percentile, longest, and how many examples
    (and tokens) lie above each bound."""
    s = sorted(lengths)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))]
    above = ", ".join(f"above {b // 1024}K: {sum(n > b for n in s)} ({sum(n for n in s if n > b):,} tokens)"
                      for b in bounds)
    return (f"lengths of the {len(s)} examples (prompt + response tokens): median {q(0.5)}, 90th percentile {q(0.9)}, "
            f"longest {s[-1]}, total {sum(s):,}; {above}")
