"""Errors, the command line and files: UserError (a mistake in the input: one clear line, no traceback), cli(),
reading any file the user names (text that is not UTF-8, JSON that does not parse, .jsonl/.csv tables: one
error naming the file and line), Hub datasets with one clear error when offline or gated, atomic
writes (a killed run never leaves half a file)."""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, added only where the help text does not state it: a default of None (the
    help says what happens then) or one the text gives itself ("default: 900") is not printed again as argparse's
    placeholder, which would contradict it ("default: 900 ... (default: -1)")."""
    def _get_help_string(self, action):
        text = action.help or ""
        return text if action.default is None or "default:" in text.lower() else super()._get_help_string(action)


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
def decode_text(data: bytes, where: str) -> str:
    """Bytes of a file the user named -> text. UTF-8, with or without a BOM; anything else (a binary file,
    UTF-16, Latin-1) is one error naming the file and the line of the first bad byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserError(f"{where}: UTF-16 text; save it as UTF-8")
    try:
        text, bad = data.decode("utf-8-sig"), None  # -sig: a BOM (Excel, Notepad) is dropped, not read as text
    except UnicodeDecodeError as e:
        text, bad = None, e.start
    nul = data.find(b"\x00")  # valid UTF-8, but text never holds one; binary files nearly always do
    if bad is None and nul < 0:
        return text
    at = min(k for k in (bad, nul) if k is not None and k >= 0)
    what, line = "a NUL byte" if at == nul else f"byte 0x{data[at]:02x}", data.count(b"\n", 0, at) + 1
    raise UserError(f"{where}:{line}: not UTF-8 text ({what} at offset {at}); "
                    "a binary file? Save text as UTF-8")


def read_text(path, flag: str | None = None) -> str:
    """A text file the user named (decode_text's rules). Errors name the flag, if given, and the file."""
    where = f"{flag} {path}" if flag else str(path)
    if not os.path.exists(path):
        raise UserError(f"{where}: no such file")
    if os.path.isdir(path):
        raise UserError(f"{where}: a folder, not a file")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror})") from None
    return decode_text(data, where)


def read_json(path, flag: str | None = None):
    """A whole JSON file the user named; a syntax error names the file and its line."""
    text = read_text(path, flag)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"{flag} {path}" if flag else str(path)
        raise UserError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_table(path: str) -> list[dict]:
    """Rows of a .jsonl (one JSON object a line; .json is read the same way) or .csv file as dicts, each with
    its line number in "_line". UTF-8 with or without a BOM, LF or CRLF line ends. Every problem (not UTF-8,
    not JSON, not an object, a row with more fields than the header, no rows) is one error naming the file
    and the line."""
    path = os.fspath(path)
    if not path.endswith((".jsonl", ".json", ".csv")):
        raise UserError(f"{path}: expected a .jsonl or .csv file")
    text = read_text(path)
    rows = []
    if path.endswith((".jsonl", ".json")):
        for n, line in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                hint = "; one JSON object a line (a .jsonl file), not one JSON array" if n == 1 and \
                    line.lstrip().startswith("[") else ""
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}){hint}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: each line must be a JSON object, not {type(row).__name__}")
            rows.append({**row, "_line": n})
    else:
        csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long reasoning trace is one field
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            header = reader.fieldnames or []
            for row in reader:
                n = reader.line_num  # the line the row ends on (a quoted field may span lines)
                if None in row:
                    raise UserError(f"{path}:{n}: {len(header) + len(row[None])} fields, but the header has "
                                    f"{len(header)}")
                rows.append({**row, "_line": n})
        except csv.Error as e:
            raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
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
                        "A gated set needs its terms accepted on the Hub and a login (hf auth login); "
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


def count_or_all(text: str) -> int | None:
    """A count of queries, or 'all' (None: take every query of that label)."""
    if text.lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all', got {n}")
    return n
