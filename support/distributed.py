"""Several processes (GPUs, or CPU processes) through PyTorch's own launcher, torchrun: `torchrun --nproc_per_node N
alttrain.py ...` and `torchrun --nproc_per_node N eval.py ...`. Without torchrun (or with one process) every function
here is a no-op and a run is exactly what it was: the same files, the same adapter bit for bit.

Training (alttrain.py). Every rank forms the whole step itself - its examples from (seed, epoch), sorted by length
and cut into micro-batches, the loss normaliser of the whole step - so no data moves between ranks. Rank r trains
micro-batches r, r+N, r+2N, ... of the step; then sum_grads() adds the ranks' LoRA gradients with one all_reduce
(SUM), before clipping, so every rank clips and steps on the same gradient and the adapters stay identical: the
same examples in the same steps as one process, the sum taken in another order (floating-point rounding only).
Not DistributedDataParallel: DDP averages (divides by N) in hooks that fire in every backward pass, so every rank
must run the same number of backward passes - a step's share is often uneven (the last step of an epoch, 9
micro-batches over 2 ranks), and a rank with none would hang the others. One all_reduce a step of the LoRA
gradients (20 MB for SmolLM2, 170 MB for R1-8B) costs little next to the step, and has no such rule.
The examples, their assessments and their tokens are built once, on rank 0, and broadcast; only rank 0 writes
the run folder (the log, checkpoints, the adapter) and reads it back on --resume (then broadcast), so other
machines need no shared filesystem, and a checkpoint does not depend on N.

Evaluation (eval.py). Greedy batched generation with left padding can differ in the last digits with what shares a
batch, so the ranks split whole batches, formed as one process forms them (the prompts left to do, longest
first, cut at --batch-size): rank r generates batches r, r+N, ... and appends each answer to its own part file,
<bench>.rank<r>.jsonl. A killed run resumes: rank 0 first folds every part file it finds into <bench>.jsonl, each
rank adds its own part (another machine's), and the ranks agree on what is left. At the end rank 0 gathers every
rank's answers, writes <bench>.jsonl in prompt order, as one process writes it, and judges and reports alone.

On CPU the ranks share the cores: each uses cores / (processes on this machine) threads (torchrun alone would
leave them one each). Ranks other than 0 print nothing to stdout (their errors still reach stderr)."""
from __future__ import annotations

import atexit
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as td


def world() -> int:
    """Processes in this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if world() > 1 else 0


def is_main() -> bool:
    """Rank 0: the one process that writes files and prints (True without torchrun)."""
    return rank() == 0


# Two kinds of collective, two timeouts. The gradient all_reduce of a step (sum_grads) runs on the default group
# with torch's own timeout (NCCL 10 min, gloo 30 min): every rank arrives within a step, and a rank stuck longer
# is a hang worth an error. Every *wait for rank 0* - while it alone downloads the model, writes ~1,000
# assessments, merges, judges and scores - goes over a second group, gloo, with WAIT_TIMEOUT: those phases
# take minutes to hours, and under NCCL's 10-minute watchdog the waiting ranks were killed on a first run.
# A long wait costs nothing when rank 0 fails: torchrun stops the other processes as soon as one exits with
# an error, so the timeout never has to catch that. ALTTRAIN_WAIT_TIMEOUT_S changes it (seconds).
WAIT_TIMEOUT_S = 48 * 3600
_waits = None  # the gloo group the waits for rank 0 go over


def init():
    """Join torchrun's process group: NCCL on the GPU LOCAL_RANK on CUDA, gloo on CPU, and a gloo group with a
    long timeout for the waits (above). Idempotent; a no-op for one process."""
    global _waits
    if world() == 1 or td.is_initialized():
        return
    steps = timedelta(seconds=float(os.environ["ALTTRAIN_STEP_TIMEOUT_S"])) \
        if "ALTTRAIN_STEP_TIMEOUT_S" in os.environ else None  # None: torch's default (tests shorten it)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" now means this rank's GPU
        td.init_process_group("nccl", timeout=steps)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", world()))))
        td.init_process_group("gloo", timeout=steps)
    wait = float(os.environ.get("ALTTRAIN_WAIT_TIMEOUT_S", WAIT_TIMEOUT_S))
    _waits = td.new_group(backend="gloo", timeout=timedelta(seconds=wait))
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # one copy of every message: rank 0's
    atexit.register(teardown)


def teardown():
    global _waits
    if td.is_initialized():
        td.destroy_process_group()
    _waits = None


def finish(rc: int) -> int:
    """End of a script: after a success every process waits for the others (rank 0 still writing the adapter
    or the report), then all leave the group together. A process that leaves the group while another still
    works in it was seen to abort at exit (gloo: 'terminate called without an active exception'). After a
    failure there is no wait: torchrun stops the others when one exits with an error."""
    if rc == 0 and td.is_initialized():
        td.barrier(group=_waits)  # rank 0 may still be judging or merging: a wait, not a step
    teardown()
    return rc


def barrier():
    """Every rank waits here for the others (over the waits' group: rank 0 may be busy for hours)."""
    if world() > 1:
        td.barrier(group=_waits)


def broadcast(obj):
    """Rank 0's `obj` on every rank (any picklable object; the others pass None)."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    td.broadcast_object_list(box, src=0, group=_waits)
    return box[0]


def main_first(fn, *args, **kwargs):
    """fn on rank 0, then on the others (e.g. converting a model into a cache once: the others find it done)."""
    if not is_main():
        barrier()
    result = fn(*args, **kwargs)
    if is_main():
        barrier()
    return result


def sum_grads(params: list[torch.Tensor], loss_sum: float) -> float:
    """Add up every rank's gradients (one all_reduce SUM of them all, flattened) and the step's loss. A rank that
    had no micro-batch this step adds zeros. Returns the whole step's loss."""
    if world() == 1:
        return loss_sum
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.detach().reshape(-1).float() for g in grads] + [torch.tensor([loss_sum], device=grads[0].device)])
    td.all_reduce(flat, op=td.ReduceOp.SUM)
    k = 0
    for p, g in zip(params, grads):
        p.grad = flat[k:k + g.numel()].view_as(g).to(g.dtype)
        k += g.numel()
    return float(flat[-1])


def smallest(x):
    """The smallest of every rank's `x` (None counts as unlimited), on every rank; `x` itself without torchrun.
    The memory plan uses it so that every process plans for the tightest GPU and all cut the same micro-batches:
    each forms the whole step and trains its share, so plans that differed would train some examples twice and
    others never, without an error."""
    if world() == 1 or not td.is_initialized():
        return x
    known = [v for v in all_gather(x) if v is not None]
    return min(known) if known else None


def gather(obj) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the others)."""
    if world() == 1:
        return [obj]
    out = [None] * world() if is_main() else None
    td.gather_object(obj, out, dst=0, group=_waits)
    return out


# =====================================================================================================
# eval.py: answers split by whole batches, one part file per rank, merged by rank 0
# =====================================================================================================
def part(path: Path) -> Path:
    """Where this rank appends its answers: <bench>.jsonl itself for one process, else <bench>.rank<r>.jsonl."""
    return path if world() == 1 else path.with_name(f"{path.stem}.rank{rank()}.jsonl")


def resume(path: Path, items: list[dict], args) -> tuple[list[dict], list[dict]]:
    """(this rank's records so far, the items no rank has answered), as support.records.resume for one process."""
    from .records import read_records, resume as resume_file
    from .files import write_jsonl
    if world() == 1:
        return resume_file(path, items, args)
    if is_main():  # a killed run's parts (of any number of ranks) are folded into the answers file first
        parts = sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))
        if parts:
            write_jsonl(path, unique(read_records(path) + [r for p in parts for r in read_records(p)]))
            for p in parts:
                p.unlink()
    barrier()
    done, _ = resume_file(path, items, args) if is_main() else resume_file(part(path), items, args)
    seen = set().union(*all_gather({r["id"] for r in done}))
    return done, [it for it in items if it["id"] not in seen]


def merge(path: Path, done: list[dict], items: list[dict]) -> list[dict]:
    """Rank 0: every rank's records in the items' order, written to <bench>.jsonl (what one process writes), the
    part files removed after. The other ranks get []."""
    from .records import in_item_order
    from .files import write_jsonl
    if world() == 1:
        return in_item_order(done, items)
    everyone = gather(done)
    if is_main():
        kept = unique([r for rs in everyone for r in rs])
        records = in_item_order(kept, items)
        ids = {r["id"] for r in records}  # answers to prompts not asked this time (another --limit) are kept too
        write_jsonl(path, records + [r for r in kept if r["id"] not in ids])
    barrier()  # the merged file is written: each rank's part can go
    part(path).unlink(missing_ok=True)
    return records if is_main() else []


def all_gather(obj) -> list:
    out = [None] * world()
    td.all_gather_object(out, obj, group=_waits)
    return out


def unique(records: list[dict]) -> list[dict]:
    """The first record of each id (a part folded in twice, or an answer in two parts, counts once)."""
    seen, out = set(), []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out
