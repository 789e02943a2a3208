"""Answer files: eval.py appends each answer as it is generated (a killed run loses nothing) and resumes from
what is there; and the split of a generated text into reasoning and answer at </think>."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .files import UserError


def read_records(path: Path) -> list[dict]:
    """Answers written so far. A line torn by a kill mid-write is dropped (it is generated again)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def split_output(text: str, template_opened: bool) -> tuple[str, str, bool]:
    """Generated text -> (reasoning, answer, think_closed). Without a closing </think> the reasoning
    never finished (if a <think> was opened) and there is no separate answer."""
    opened = template_opened or text.lstrip().startswith("<think>")
    body = re.sub(r"^\s*<think>\s*", "", text)
    if "</think>" in body:
        reasoning, answer = body.split("</think>", 1)
        return reasoning.strip(), answer.strip(), True
    return (body.strip(), "", False) if opened else ("", body.strip(), True)


def resume(path: Path, items: list[dict], args) -> tuple[list[dict], list[dict]]:
    """(records already in `path`, items still to do). The file is rewritten without a torn last line, so
    new records can be appended; records of another --defense are refused, never mixed in."""
    done = read_records(path)
    if any(r.get("defense", "none") != args.defense for r in done):
        raise UserError(f"{path}: its answers were generated with another --defense; use another --out")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in done)
    seen = {r["id"] for r in done}
    return done, [it for it in items if it["id"] not in seen]


def in_item_order(records: list[dict], items: list[dict]) -> list[dict]:
    """The records of these items, in the items' order (generation ran longest-first)."""
    order = {it["id"]: k for k, it in enumerate(items)}
    return sorted((r for r in records if r["id"] in order), key=lambda r: order[r["id"]])
