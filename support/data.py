"""The queries: SafeChain or STAR-1 from the Hub, or a local .jsonl/.csv file, as {query, label, response, ha,
source}; every bad row is one error naming the file and line. Then the seeded selection."""
from __future__ import annotations

import functools
import random
import re
from pathlib import Path

from .files import UserError, find_column, hub_dataset, read_table, read_text


PROMPT_COLUMNS = ("prompt", "query", "instruction", "question", "goal", "forbidden_prompt")


HA_COLUMNS = ("ha", "assessment")  # optional: the query's own assessment sentence, written ahead of training


LABELS = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}


def normalise_label(value, where: str) -> str:
    """harmful/benign, also SafeChain's vanilla_harmful, adversarial_benign, ..."""
    text = str(value).strip().lower()
    for key, label in LABELS.items():
        if text == key or text.endswith("_" + key):
            return label
    raise UserError(f"{where}: unknown label {value!r} (expected harmful or benign)")


def star1_queries(rows, where: str) -> list[dict]:
    """STAR-1's rows (question, response = <think>policy-grounded reasoning</think> answer, category, ...):
    every query is a harmful-topic request answered safely, so all are labelled harmful."""
    out = []
    for i, r in enumerate(rows):
        for col in ("question", "response"):
            if not isinstance(r.get(col), str) or not r[col].strip():
                raise UserError(f"{where} row {i}: empty or missing {col!r} (STAR-1 has question and response)")
        out.append(dict(query=r["question"].strip(), label="harmful", response=r["response"], ha=None,
                        source=f"{where}#{i}"))
    return out


def load_queries(args) -> list[dict]:
    """Every candidate query as {query, label, response, source}; selection happens after."""
    if args.data == "safechain":  # gated: accept its terms on the Hub and log in (hf auth login) first
        ds = hub_dataset("UWNSL/SafeChain", "train", "--data safechain")
        return [dict(query=r["instruction"], label=normalise_label(r["label"], f"UWNSL/SafeChain row {i}"),
                     response=r["response"], source=f"UWNSL/SafeChain#{i}") for i, r in enumerate(ds)]
    if args.data == "star1":
        return star1_queries(hub_dataset("UCSC-VLAA/STAR-1", "train", "--data star1"), "UCSC-VLAA/STAR-1")
    rows = read_table(args.data)
    qcol = find_column(rows[0], PROMPT_COLUMNS, args.data, "prompt")
    lcol = find_column(rows[0], ("label", "category_label", "type"), args.data, "label")
    rcol = find_column(rows[0], ("response", "reference", "trace"), args.data, "response", required=False)
    hcol = find_column(rows[0], HA_COLUMNS, args.data, "assessment", required=False)
    out = []
    for row in rows:
        where = f"{args.data}:{row['_line']}"
        query = row.get(qcol)
        if query is not None and not isinstance(query, str):
            raise UserError(f"{where}: {qcol!r} must be text, not {type(query).__name__}")
        if not isinstance(query, str) or not query.strip():
            raise UserError(f"{where}: empty or missing {qcol!r}")
        response = row.get(rcol) if rcol else None
        ha = row.get(hcol) if hcol else None
        for col, value in ((rcol, response), (hcol, ha)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"{where}: {col!r} must be text, not {type(value).__name__}")
        out.append(dict(query=query.strip(), label=normalise_label(row.get(lcol), where),
                        response=response if isinstance(response, str) and response.strip() else None,
                        ha=ha.strip() if isinstance(ha, str) and ha.strip() else None, source=where))
    return out


def select_queries(queries: list[dict], n_harmful: int | None, n_benign: int | None, seed: int) -> list[dict]:
    """The paper's 900 harmful + 100 benign, drawn deterministically from the seed (None: all of that label)."""
    rng = random.Random(seed)
    chosen = []
    for label, n in (("harmful", n_harmful), ("benign", n_benign)):
        pool = [q for q in queries if q["label"] == label]
        n = len(pool) if n is None else n
        if n > len(pool):
            print(f"note: asked for {n} {label} queries, the data has {len(pool)}; using all of them")
        chosen += rng.sample(pool, min(n, len(pool)))
    if not chosen:
        raise UserError(f"the selection is empty (--n-harmful {'all' if n_harmful is None else n_harmful}, "
                        f"--n-benign {'all' if n_benign is None else n_benign}, "
                        f"{len(queries)} queries in --data)")
    return chosen


def split_response(response: str | None) -> tuple[str, str]:
    """A reference response (SafeChain style: trace, </think>, answer) -> (reasoning, answer).
    SafeChain's responses lack the opening <think>; others may have it. No </think> -> all reasoning."""
    if not response:
        return "", ""
    text = re.sub(r"^\s*<think>\s*", "", response)
    if "</think>" in text:
        reasoning, answer = text.split("</think>", 1)
        return reasoning.strip(), answer.strip()
    return text.strip(), ""


@functools.lru_cache(maxsize=None)
def read_lines(path: Path) -> tuple[str, ...]:
    """The lines of a prompt file (one option a line; # starts a comment), read once per process."""
    return tuple(l.strip() for l in read_text(path).splitlines() if l.strip() and not l.startswith("#"))


def load_ha_prompt(path: str) -> str:
    text = read_text(path, "--ha-prompt")
    if "{query}" not in text:
        raise UserError(f"--ha-prompt {path}: the prompt must contain {{query}}")
    return text


def read_refusals(path: str) -> list[str]:
    read_text(path, "--cr-refusals")  # one clear error for a missing, binary or non-UTF-8 file
    lines = read_lines(Path(path))
    if not lines:
        raise UserError(f"--cr-refusals {path}: no refusal lines (one a line; # starts a comment)")
    return lines


def check_structure_data(args, queries: list[dict]):
    """'original' trains on the reference responses as they are, so every query needs a whole one (trace,
    </think>, answer): a self-trace of a harmful query could be a harmful answer, and a first sentence alone
    (as data/train.jsonl keeps for harmful rows) teaches nothing to answer."""
    if args.structure != "original":
        return
    bad = [q for q in queries if not all(split_response(q.get("response")))]
    if bad:
        raise UserError(f"--structure original needs a whole reference response (trace, </think>, answer) for "
                        f"every query; {len(bad)} of {len(queries)} have none, e.g. {bad[0]['source']} "
                        f"({bad[0]['query'][:60]!r})")


def read_built(path: str) -> list[dict]:
    """alttrain.py --built: examples built earlier (query, label, response, ...), checked row by row."""
    rows = read_table(path)
    for row in rows:
        missing = [k for k in ("query", "label", "response") if k not in row]
        if missing:
            raise UserError(f"{path}:{row['_line']}: not a built example (missing {', '.join(missing)});"
                            " use --data for raw queries")
        for k in ("query", "response"):
            if not isinstance(row[k], str) or not row[k].strip():
                raise UserError(f"{path}:{row['_line']}: {k!r} must be non-empty text, not {row[k]!r:.40}")
        if row["label"] not in ("harmful", "benign"):
            raise UserError(f"{path}:{row['_line']}: label {row['label']!r} (expected harmful or benign)")
    return [{k: v for k, v in r.items() if k != "_line"} for r in rows]


def has_trace(q: dict) -> bool:
    """Harmful queries need a trace (for PU); benign ones a trace and an answer (for CR)."""
    reasoning, answer = split_response(q.get("response"))
    return bool(reasoning) and (q["label"] == "harmful" or bool(answer))
