"""Errors, the command line and files: UserError (a mistake in the input: one clear line, no traceback), cli(),
.jsonl/.csv tables with file:line errors, Hub datasets with one clear error when offline or gated, atomic
writes (a killed run never leaves half a file)."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
PROMPTS = ROOT / "prompts"


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


def require_positive(args, *flags):
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
