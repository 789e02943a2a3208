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
    CUDA plans for a GPU that is not here (only with --dry-run), assumed to support bf16 (Ampere or newer)."""
    planned_gpu = args.gpu_memory_gib is not None and device() != "cuda"
    if planned_gpu and not args.dry_run:
        raise UserError("--gpu-memory-gib without a CUDA GPU only plans (add --dry-run); this machine would train on CPU")
    cuda = device() == "cuda" or planned_gpu
    if planned_gpu and args.dtype == "auto":
        return cuda, torch.bfloat16, "bf16 (--dtype auto, planned for a GPU with bf16: Ampere or newer, e.g. A6000)"
    return (cuda, *compute_dtype(args.dtype, "cuda" if cuda else "cpu"))


def check_generation_memory(args, config, quant: bool, dtype_bytes: int, cuda: bool, longest_prompt: int):
    """alttrain.py's self-traces and assessments: refuse before the model is loaded if they cannot fit."""
    est = memory.generation(config, quant=quant, dtype_bytes=dtype_bytes, batch=args.gen_batch_size,
                            prompt_len=longest_prompt + 256, max_new=max(args.self_trace_tokens, 64), cuda=cuda)
    check_memory(args, f"self-traces and assessments (batch {args.gen_batch_size})", est,
                 "try a smaller --gen-batch-size or --self-trace-tokens")


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


def plan_training(args, config, quant: bool, dtype_bytes: int, cuda: bool, data: list[dict] | None = None,
                  already_loaded: int = 0) -> int:
    """The training memory plan: print each term and pick the micro-batch. Returns the micro-batch size.

    Without `data` (before anything is loaded or downloaded) it plans for the worst case the flags allow:
    micro-batches of examples of --max-len tokens, every token supervised. With `data` (after tokenisation)
    it plans for the real lengths. A micro-batch only splits a step (same examples, same update), so
    without --micro-batch-size the fewest micro-batches that fit are chosen. Before loading, it refuses only
    a run that cannot fit even one example of --max-len tokens; a --micro-batch-size too large for that worst
    case is noted and decided by the real lengths. `already_loaded`: bytes of weights in memory already (not
    free, and not needed again). Under torchrun the plan is per rank: each trains its share of a step's batch."""
    batch, ranks = math.ceil(args.batch_size / dist.world()), dist.world()  # one process: the whole batch
    if ranks > 1 and (args.micro_batch_size or 0) > batch:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is more than each of the {ranks} processes' share "
                        f"of --batch-size {args.batch_size} ({batch}): some would idle; pass at most {batch}")
    pad = pad_multiple("cuda" if cuda else "cpu", torch.bfloat16 if dtype_bytes == 2 else torch.float32)
    if data is None:
        width = round_up(args.max_len, pad)  # as the loop pads it (collate)
        sup, what = [args.max_len] * batch, f"the longest examples --max-len allows ({args.max_len} tokens each)"
    else:
        longest = max(len(ex["input_ids"]) for ex in data)
        width = round_up(longest, pad)
        sup = sorted((sum(l != -100 for l in ex["labels"][1:]) for ex in data), reverse=True)
        what = f"the data's real lengths (longest {longest} tokens" + (f", padded to {width})" if width > longest else ")")
    free = memory_free(args, cuda)
    room = float("inf") if free is None else free + already_loaded
    est = {m: training_estimate(args, config, quant, dtype_bytes, cuda, width, sup, m)
           for m in range(batch, 0, -1)}
    fitting = [m for m, e in est.items() if e["total"] <= room]
    micro = args.micro_batch_size or 1
    if fitting and not args.micro_batch_size:  # as few micro-batches as fit, of equal size (7 fits 8: two of 4)
        micro = math.ceil(batch / math.ceil(batch / fitting[0]))
    where = "cuda" if cuda else "cpu"
    free_txt = "unknown" if free is None else f"{free / memory.GiB:.1f} GiB" + (
        " (--gpu-memory-gib)" if getattr(args, "gpu_memory_gib", None) else f" free on {where}")
    chosen = "" if args.micro_batch_size else " (auto: fewest micro-batches that fit)" if fitting else " (nothing fits)"
    print(f"memory plan for training, {what}; {free_txt}")
    share = f" (each of {ranks} processes' share of {args.batch_size})" if ranks > 1 else ""
    print(f"  micro-batch {micro} of batch {batch}{share}{chosen}: {math.ceil(batch / micro)} "
          f"micro-batch(es) a step{' per process' if ranks > 1 else ''}, effective batch {args.batch_size}")
    print(f"  needs {memory.describe(est[min(micro, batch)])}" + (" per process" if ranks > 1 else ""))
    print("  by micro-batch: " + ", ".join(f"{m}: {e['total'] / memory.GiB:.1f}" for m, e in est.items()) + " GiB")
    need = est[min(micro, batch)]["total"]
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
