"""
How eval.py reads benchmark files: JailbreakBench's attack artifacts, local .csv/.jsonl safety sets,
multi-turn conversations and task sets (support/tasks.py's schemas). Every bad row is named by its file and line.
Support code for eval.py (its section 1 says which benchmarks exist and dispatches here).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import tasks
from .data import normalise_label
from .files import UserError, find_column, read_json, read_table

JBB_ARTIFACTS = "https://raw.githubusercontent.com/JailbreakBench/artifacts/main/attack-artifacts"


def load_jbb_artifact(name: str, artifact: str, args) -> list[dict]:
    """One jailbreak prompt per JBB behaviour from JailbreakBench's artifact JSON ({"jailbreaks": [{index,
    goal, behavior, prompt, ...}]}). Behaviours for which the attack found no prompt (PAIR has some) are
    counted in args.no_prompt and the report, never filled in."""
    method, model = artifact.split("/")[0], args.jbb_artifact_model
    src = args.jbb_artifacts
    if src is None or src.startswith(("http://", "https://")):
        where = f"{(src or JBB_ARTIFACTS).rstrip('/')}/{artifact}/{model}.json"
        import urllib.request
        try:
            data = json.loads(urllib.request.urlopen(where, timeout=60).read())
        except Exception as e:
            raise UserError(f"--bench {name}: cannot fetch {where} ({type(e).__name__}: {str(e)[:150]}). Offline, "
                            "pass a local copy with --jbb-artifacts FOLDER") from None
    else:
        candidates = [Path(src) / f"{method}_{model}.json", Path(src) / artifact / f"{model}.json"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise UserError(f"--bench {name}: neither {candidates[0]} nor {candidates[1]} exists "
                            f"(--jbb-artifacts {src}, --jbb-artifact-model {model})")
        where = str(path)
        data = read_json(path)
    jailbreaks = data.get("jailbreaks") if isinstance(data, dict) else None
    if not isinstance(jailbreaks, list) or not all(isinstance(j, dict) and isinstance(j.get("index"), int)
                                                   for j in jailbreaks):
        raise UserError(f"{where}: not a JailbreakBench artifact (expected a 'jailbreaks' list of objects with "
                        "an integer index)")
    items = [dict(id=int(j["index"]), prompt=j["prompt"], label="harmful", behavior=j.get("behavior"))
             for j in jailbreaks if isinstance(j.get("prompt"), str) and j["prompt"].strip()]
    args.no_prompt[name] = len(jailbreaks) - len(items)
    return items


def load_local_file(name: str, args) -> list[dict]:
    """A file of a task's schema (an answer column, HumanEval's or CNN/DailyMail's columns: support/tasks.py) is
    a task set; otherwise a safety set (prompt + label)."""
    rows = read_table(name)
    if tasks.is_task_row(rows[0]):
        return task_items(rows, name, args)
    if tcol := find_column(rows[0], ("turns",), name, "turns", required=False):
        lcol = find_column(rows[0], ("label",), name, "label", required=False)
        return [conversation_item(i, r[tcol], normalise_label(r[lcol], f"{name}:{r['_line']}") if lcol
                                  else (args.label or "harmful"), f"{name}:{r['_line']}") for i, r in enumerate(rows)]
    names = [args.prompt_column.lower()] if args.prompt_column else \
        ["prompt", "goal", "forbidden_prompt", "instruction", "question", "query"]
    qcol = find_column(rows[0], names, name, "prompt")
    lcol = find_column(rows[0], ("label",), name, "label", required=False)
    if lcol is None and args.label is None:
        raise UserError(f"{name}: no label column; pass --label harmful or --label benign")
    items = []
    for i, r in enumerate(rows):
        where = f"{name}:{r['_line']}"
        if r.get(qcol) is not None and not isinstance(r[qcol], str):
            raise UserError(f"{where}: {qcol!r} must be text, not {type(r[qcol]).__name__}")
        if not str(r.get(qcol) or "").strip():
            raise UserError(f"{where}: empty {qcol!r}")
        label = normalise_label(r[lcol], where) if lcol else args.label
        items.append(dict(id=i, prompt=str(r[qcol]).strip(), label=label))
    return items


def conversation_item(i: int, turns, label: str, where: str) -> dict:
    """A multi-turn benchmark item: its user turns, in order (a JSON list; in a CSV, a JSON-encoded one)."""
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise UserError(f"{where}: 'turns' must be a list of user messages (in a CSV, as JSON)") from None
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise UserError(f"{where}: 'turns' must be a non-empty list of non-empty user messages")
    return dict(id=i, prompt=turns[-1].strip(), turns=[t.strip() for t in turns], label=label)


def task_items(rows: list[dict], where: str, args) -> list[dict]:
    """Rows of a task set -> items (tasks.task_item); a bad row is named by its line (or row number)."""
    items = []
    for i, r in enumerate(rows):
        try:
            items.append(tasks.task_item(i, r, args.prompt_column))
        except tasks.TaskError as e:
            line = f"{where}:{r['_line']}" if "_line" in r else f"{where} {i}"
            raise UserError(f"{line}: {e}") from None
    return items
