"""The run folder: no silent overwrite of a finished run, resume checks, checkpoints (adapter, optimiser,
schedule position, RNG) swapped in atomically."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from . import distributed as dist
from .files import UserError, read_json, require_positive, write_jsonl
from .models import load_model


# =====================================================================================================
# 3. The run folder: no silent overwrite, resume checks, checkpoints
# =====================================================================================================
CONFIG_NAME, DATA_NAME, LOG_NAME, CKPT_NAME = "alttrain_config.json", "alttrain_data.jsonl", "train_log.jsonl", "checkpoint"


def check_train_flags(args):
    """alttrain.py's numeric flags, each bad value named by its flag, before anything is loaded."""
    require_positive(args, "batch_size", "micro_batch_size", "epochs", "save_every", "max_len", "gen_batch_size")
    if not args.ha_weight > 0:
        raise UserError(f"--ha-weight {args.ha_weight}: must be above 0")
    if args.loss_chunk < 0 or (args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0):
        raise UserError("--loss-chunk must be >= 0 and --gpu-memory-gib above 0")
    if args.truncate and not args.max_len:
        raise UserError("--truncate cuts examples to --max-len tokens: pass --max-len too")
    if args.micro_batch_size and args.micro_batch_size > args.batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size {args.batch_size}")


def prepare_out_dir(args) -> Path:
    """--out checked against what is there (a finished run, an unfinished one, --resume with nothing to resume).
    The folder is not created here: alttrain.py creates it just before its first file, so a run that fails to
    start (offline, a bad --data file) leaves no empty folder behind."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: a file, not a folder")
    cfg_path = out / CONFIG_NAME
    if cfg_path.exists():
        try:
            cfg = read_json(cfg_path)
        except UserError as e:  # a damaged config: only --overwrite may replace what is there
            if not args.overwrite:
                raise UserError(f"{e}; pass --overwrite to start this run again, or choose another --out") from None
            cfg = {}
        if not isinstance(cfg, dict):
            raise UserError(f"{cfg_path}: not a run config of alttrain.py; pass --overwrite or choose another --out")
        if cfg.get("finished") and not args.overwrite:
            raise UserError(f"--out {out} already holds a finished run; pass --overwrite to replace it, "
                            "or choose another --out")
        if not cfg.get("finished") and not (args.resume or args.overwrite):
            raise UserError(f"--out {out} holds an unfinished run; pass --resume to continue it or "
                            "--overwrite to start again")
    elif args.resume:
        raise UserError(f"--resume: {out} holds no run to continue")
    return out


# Flags that say how to run, not what to train: a micro-batch only splits a step, the loss chunk only splits
# the loss, the attention kernel computes the same attention, and the memory check only decides whether to start. --resume may change them; any other flag
# must be what the run was started with. --dtype is compared as resolved (bf16 or fp32: different arithmetic),
# since `auto` can resolve differently on another machine.
HOW_TO_RUN = ("resume", "overwrite", "halt_after", "micro_batch_size", "skip_memory_check", "gpu_memory_gib",
              "dry_run", "loss_chunk", "dtype", "attention")


# Flags that choose which examples train: a run refused before its first step (an example too long for the GPU)
# may continue with them changed, as the refusal says; once a step has trained they are the run's.
BEFORE_TRAINING = ("max_len", "truncate")


def clear_old_run(out: Path):
    """--overwrite: remove the old run's files, called only once the new examples are built, so a run that
    fails to start (a bad --data file, a refused plan) never costs the run that was there."""
    for name in os.listdir(out) if out.is_dir() else []:  # --overwrite of a folder not there yet: nothing to clear
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def check_resume_matches(out: Path, config: dict):
    """--resume must continue the same run, or it would not end where the original would: the same examples
    (by hash) and the same flags, apart from the ones that only say how to run it."""
    old = read_json(out / CONFIG_NAME)
    if old.get("data_sha256") != config["data_sha256"]:
        raise UserError(f"--resume: the examples differ from the run in {out}")
    now = json.loads(json.dumps(config["args"]))  # tuples -> lists, as stored
    free = HOW_TO_RUN + (BEFORE_TRAINING if not (out / CKPT_NAME).exists() else ())
    changed = [k for k, v in old["args"].items() if k not in free and now.get(k) != v]
    if old.get("dtype", "fp32") != config["dtype"]:  # --dtype auto can resolve differently on another machine
        raise UserError(f"--resume: the run in {out} computed in {old.get('dtype', 'fp32')}, this one would compute "
                        f"in {config['dtype']} ({config['dtype_reason']}); a resumed run must keep its arithmetic: "
                        f"pass --dtype {old.get('dtype', 'fp32')}")
    if changed:
        raise UserError(f"--resume: these flags differ from the run in {out}: "
                        + ", ".join(f"--{k.replace('_', '-')} (was {old['args'][k]!r})" for k in changed))


def truncate_log(out: Path, step: int):
    """On resume: drop the log rows after the checkpoint's step (those steps are trained, and logged, again)."""
    log = out / LOG_NAME
    rows = []
    for line in open(log, encoding="utf-8") if log.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill mid-write: that step is trained and logged again
            break
        if row["step"] <= step:
            rows.append(row)
    write_jsonl(log, rows)


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
    """The checkpoint's step (0 if none), its adapter, optimiser state and RNG loaded. Under torchrun rank 0 alone
    reads the run folder and the others receive what it read (no shared filesystem needed, any number of ranks)."""
    from peft import set_peft_model_state_dict
    found = dist.broadcast(read_saved_checkpoint(out) if dist.is_main() else None)
    if found is None:
        return 0
    adapter, state = found
    set_peft_model_state_dict(model, adapter)
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state)
    return state["step"]


def restore_rng(state: dict):
    """The checkpoint's CPU, Python and CUDA random states. The CUDA states are one per GPU the saving machine had:
    each GPU here takes the saved state of the same index; GPUs the saving machine lacked keep theirs, and states
    of GPUs this machine lacks are left out (torch.cuda.set_rng_state_all would index past the last device: a run
    saved on 2 GPUs could not resume on 1, nor on CPU)."""
    torch.set_rng_state(state["torch_rng"])
    saved = state.get("cuda_rng") or []
    here = torch.cuda.device_count() if saved and torch.cuda.is_available() else 0
    for index, rng in enumerate(saved[:here]):
        torch.cuda.set_rng_state(rng, index)
    random.setstate(state["python_rng"])


def read_saved_checkpoint(out: Path) -> tuple[dict, dict] | None:
    """(adapter weights, trainer state) of the run's checkpoint, or None."""
    from safetensors.torch import load_file
    ckpt = out / CKPT_NAME
    if not ckpt.exists() and (out / (CKPT_NAME + ".old")).exists():  # killed mid-swap
        ckpt = out / (CKPT_NAME + ".old")
    if not ckpt.exists():
        return None
    return (load_file(str(ckpt / "adapter_model.safetensors")),
            torch.load(ckpt / "trainer_state.pt", weights_only=True, map_location="cpu" if dist.world() > 1 else None))


def save_final(out: Path, model, tok):
    """The trained adapter and the tokenizer, written beside and then moved in."""
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def merge_adapter(path: str, out: Path, tok, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    """Merged weights need an unquantised base: merging into 4-bit weights would round the update away."""
    from peft import PeftModel
    base = load_model(path, quant=False, trust_remote_code=trust_remote_code, allow_cpu=True, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    tmp = out / "merged.tmp"
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out / "merged")
