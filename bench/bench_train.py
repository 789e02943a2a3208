"""
Training: alttrain.py's loop against TRL's SFTTrainer + PEFT, on the same examples, model and settings.

Both trainers get the same tokenized quick-start examples (data/train.jsonl, built as alttrain.py builds
them: prompt by the chat template, response + EOS, labels -100 on the prompt), the same base model loaded by
alttrain.load_model (4-bit NF4 or full precision), the same LoRA (r16, alpha16, dropout 0, all seven
projections, all layers), the same optimiser and schedule (8-bit AdamW, betas 0.9/0.95, wd 1e-4, cosine with
5 warmup steps, clip 1.0), batch 8, gradient checkpointing (non-reentrant), fp32 on CPU / bf16 on GPU.
They differ only in the trainer: batch order (ours groups by length; TRL samples at random by default), how
the loss is computed, and per-step overhead.

Each (model, quant, trainer) runs in its own process, so its peak memory is its own. Measured per run:
wall time per epoch (the training loop only: model loading and data preparation excluded), supervised
tokens/s, peak memory (CPU: the process's max RSS; GPU: torch's max allocated), the mean and last logged
step loss, and the loss over the whole set after training (the same function for both, so a like-for-like
check that both optimise the same objective; before training it is one number, the base model's).

    python bench/bench_train.py                          # smollm2-135m and tiny, 4-bit and plain, 1 epoch
    python bench/bench_train.py --models tiny --epochs 3
Results: printed as a table, and bench/results/train.json. Finished runs are kept and reused on re-run
(--fresh to measure again). Needs `pip install -r bench/requirements.txt` (TRL).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import common as c
from common import at

LORA = dict(r=16, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
SETTINGS = dict(batch_size=8, warmup_steps=5, betas=(0.9, 0.95), weight_decay=1e-4, grad_clip=1.0, seed=1995)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "tiny"], help="alttrain aliases or 'tiny'")
    p.add_argument("--quant", nargs="+", choices=("4bit", "plain"), default=["4bit", "plain"])
    p.add_argument("--trainers", nargs="+", choices=("ours", "trl", "trl-fp32", "trl-grouped"), default=["ours", "trl"],
                   help="trl = SFTTrainer's defaults. Variants, to explain a difference: trl-fp32 keeps QLoRA "
                        "adapters in fp32 (SFTTrainer casts them to bf16); trl-grouped batches by length "
                        "(train_sampling_strategy='group_by_length')")
    p.add_argument("--epochs", type=int, default=1, help="passes over the 159 examples")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="the quick start's (the recipe's 1e-5 barely moves the loss in one epoch)")
    p.add_argument("--optim", choices=("adamw8bit", "adamw"), default="adamw8bit")
    p.add_argument("--fresh", action="store_true", help="measure again runs already in the results file")
    p.add_argument("--out", default="train.json", help="file name under bench/results/")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "QUANT", "TRAINER"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_loss(model, data: list[dict], pad_id: int) -> float:
    """Mean response loss over every supervised token of the set: one number both trainers can be judged by."""
    import torch
    model.eval()
    total = n = 0.0
    with torch.no_grad():
        for idx in at.length_grouped_batches([len(ex["input_ids"]) for ex in data], 8, seed=0):
            b = {k: v.to(model.device) for k, v in at.collate([data[i] for i in idx], pad_id).items()}
            total += float(at.response_loss_sum(model, b))
            n += int((b["labels"][:, 1:] != -100).sum())
    return total / n


def run_ours(model, tok, data, args, quant: bool, out: str) -> dict:
    """alttrain.py's own add_lora + train, exactly as `python alttrain.py` calls them."""
    # every setting from LORA/SETTINGS, as TRL gets them, so one edit changes both trainers
    flags = ["--epochs", args.epochs, "--lr", args.lr, "--optim", args.optim, "--out", out, "--save-every", 10**6,
             "--batch-size", SETTINGS["batch_size"], "--warmup-steps", SETTINGS["warmup_steps"],
             "--betas", *SETTINGS["betas"], "--weight-decay", SETTINGS["weight_decay"],
             "--grad-clip", SETTINGS["grad_clip"], "--seed", SETTINGS["seed"],
             "--lora-r", LORA["r"], "--lora-alpha", LORA["lora_alpha"], "--lora-dropout", LORA["lora_dropout"],
             "--lora-targets", ",".join(LORA["target_modules"])] + ([] if quant else ["--no-quant"])
    targs = at.build_parser().parse_args([str(f) for f in flags])
    model = at.add_lora(model, targs, quant)
    t0 = time.time()
    metrics = at.train(targs, model, tok, data, Path(out))
    wall = time.time() - t0
    losses = [json.loads(line)["loss"] for line in open(Path(out) / at.LOG_NAME)]
    return dict(model=model, wall_s=wall, steps=metrics["steps"], losses=losses)


def run_trl(model, tok, data, args, quant: bool, out: str, variant: str = "trl") -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer
    # Pre-tokenized (input_ids + labels): TRL keeps them as they are, so both trainers see identical tokens.
    dataset = Dataset.from_list([dict(input_ids=ex["input_ids"], labels=ex["labels"]) for ex in data])
    cuda = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=out, num_train_epochs=args.epochs, per_device_train_batch_size=SETTINGS["batch_size"],
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=SETTINGS["warmup_steps"], optim="adamw_bnb_8bit" if args.optim == "adamw8bit" else "adamw_torch",
        adam_beta1=SETTINGS["betas"][0], adam_beta2=SETTINGS["betas"][1], weight_decay=SETTINGS["weight_decay"],
        max_grad_norm=SETTINGS["grad_clip"], gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=cuda, use_cpu=not cuda,
        max_length=None, seed=SETTINGS["seed"], save_strategy="no", report_to="none", logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if variant == "trl-grouped" else "random")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         peft_config=LoraConfig(**LORA, bias="none", task_type="CAUSAL_LM"))
    if variant == "trl-fp32":  # undo SFTTrainer's cast of QLoRA adapters to bf16 (slow on CPUs without bf16 units)
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(model=trainer.model, wall_s=wall, steps=trainer.state.global_step, losses=losses)


def worker(name: str, quant_name: str, trainer: str, args) -> dict:
    """One measured run, in its own process. Prints one JSON line last."""
    import torch
    path = c.model_path(name)
    tok = at.load_tokenizer(path)
    data = [dict(input_ids=ex["input_ids"], labels=ex["labels"]) for ex in c.quickstart_examples(tok)]
    quant = quant_name == "4bit"
    torch.manual_seed(SETTINGS["seed"])
    model = at.load_model(path, quant=quant, allow_cpu=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    mem_loaded = peak_memory_mb()
    torch.manual_seed(SETTINGS["seed"])
    with tempfile.TemporaryDirectory() as out:
        r = run_ours(model, tok, data, args, quant, out) if trainer == "ours" else \
            run_trl(model, tok, data, args, quant, out, variant=trainer)
    peak = peak_memory_mb()  # before the set losses below, which are not training
    with r["model"].disable_adapter():  # the base model alone: the same number for both trainers
        loss_before = set_loss(r["model"], data, tok.pad_token_id)
    supervised = sum(sum(l != -100 for l in ex["labels"][1:]) for ex in data) * args.epochs
    return dict(model=name, quant=quant_name, trainer=trainer, epochs=args.epochs, steps=r["steps"],
                examples=len(data), supervised_tokens=supervised,
                wall_s=round(r["wall_s"], 2), wall_per_epoch_s=round(r["wall_s"] / args.epochs, 2),
                supervised_tok_per_s=round(supervised / r["wall_s"], 1),
                peak_mem_mb=round(peak), mem_after_load_mb=round(mem_loaded),
                loss_mean=round(sum(r["losses"]) / len(r["losses"]), 4), loss_last=round(r["losses"][-1], 4),
                set_loss_before=round(loss_before, 4),
                set_loss_after=round(set_loss(r["model"], data, tok.pad_token_id), 4))


def table(runs: dict) -> str:
    rows = ["| model | weights | trainer | s/epoch | supervised tok/s | peak MB | loss mean / last | set loss after |",
            "|---|---|---|---|---|---|---|---|"]
    order = ("ours", "trl", "trl-fp32", "trl-grouped")
    for r in sorted(runs.values(), key=lambda r: (r["model"], r["quant"], order.index(r["trainer"]))):
        rows.append(f"| {r['model']} | {r['quant']} | {r['trainer']} | {r['wall_per_epoch_s']:.1f} | "
                    f"{r['supervised_tok_per_s']:.0f} | {r['peak_mem_mb']} | {r['loss_mean']:.3f} / "
                    f"{r['loss_last']:.3f} | {r['set_loss_after']:.3f} |")
    return "\n".join(rows)


def ratios(runs: dict) -> dict:
    """ours/TRL for each (model, quant) measured with both: speed > 1 and memory < 1 favour ours."""
    out = {}
    for key, ours in runs.items():
        trl = runs.get(key.replace("/ours", "/trl"))  # TRL as it comes (not trl-fp32)
        if not key.endswith("/ours") or trl is None:
            continue
        out[key[:-len("/ours")]] = dict(
            speed=round(ours["supervised_tok_per_s"] / trl["supervised_tok_per_s"], 3),
            peak_mem=round(ours["peak_mem_mb"] / trl["peak_mem_mb"], 3),
            set_loss_after_diff=round(ours["set_loss_after"] - trl["set_loss_after"], 4))
    return out


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' v6 renames, said once per call
        print(json.dumps(worker(*args.worker, args)))
        return
    path = c.RESULTS / args.out
    old = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    settings = dict(epochs=args.epochs, lr=args.lr, optim=args.optim, lora=LORA, **SETTINGS)
    runs = old.get("runs", {}) if old.get("settings") == json.loads(json.dumps(settings)) else {}
    for name in args.models:
        for quant in args.quant:
            for trainer in args.trainers:
                key = f"{name}/{quant}/{trainer}"
                if key in runs:
                    print(f"{key}: kept from {path} (--fresh to measure again)")
                    continue
                print(f"== {key}", flush=True)
                cmd = [sys.executable, __file__, "--worker", name, quant, trainer, "--epochs", str(args.epochs),
                       "--lr", str(args.lr), "--optim", args.optim]
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
                if proc.returncode:
                    sys.exit(f"{key}: the run failed (exit {proc.returncode}); see the messages above")
                runs[key] = json.loads(proc.stdout.strip().splitlines()[-1])
                # saved after every run: an interrupted benchmark keeps what it measured
                c.save(args.out, dict(machine=c.machine(), settings=settings, runs=runs, ratios=ratios(runs)))
    print(table(runs))
    for key, r in ratios(runs).items():
        print(f"{key}: ours/TRL speed {r['speed']:.2f}x, peak memory {r['peak_mem']:.2f}x, "
              f"set loss after ours - TRL {r['set_loss_after_diff']:+.4f}")


if __name__ == "__main__":
    main()
