"""What the bench/ scripts share: the quick-start examples, the models they run on, machine facts, output."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import alttrain as at  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TINY = dict(hidden=256, layers=4)  # a tiny random Llama: big enough to do work, small enough to show overhead


def model_path(name: str) -> str:
    """'tiny' -> a random Llama with an R1-style template (built once, under bench/results/); else an alttrain alias."""
    if name != "tiny":
        return at.resolve_model(name, os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain"))
    from support.tiny import make_model
    folder = RESULTS / "tiny-model"
    if not (folder / "config.json").exists():
        make_model(folder, **TINY)
    return str(folder)


def quickstart_examples(tok) -> list[dict]:
    """The quick start's training set (data/train.jsonl, template assessments), tokenized as alttrain.py does."""
    args = at.parse_args(["--data", str(ROOT / "data" / "train.jsonl"), "--ha-model", "template"])
    queries = at.load_queries(args)
    n_harmful = sum(q["label"] == "harmful" for q in queries)
    queries = at.select_queries(queries, n_harmful, len(queries) - n_harmful, args.seed)  # all, in the seeded order
    examples, _ = at.build_examples(args, queries)
    return [dict(at.encode_example(tok, ex["query"], ex["response"]), label=ex["label"]) for ex in examples]


def machine() -> dict:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(date=time.strftime("%Y-%m-%d"), cpu=cpu, cores=os.cpu_count(), gpu=gpu,
                torch=torch.__version__, python=platform.python_version())


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    at.atomic_write(path, json.dumps(result, indent=2))
    print(f"-> {path}")
    return path
