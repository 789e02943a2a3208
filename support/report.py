"""eval.py's report: rates with bootstrap intervals, output statistics, and the markdown tables (one run, or
runs side by side with --compare)."""
from __future__ import annotations

import random

from . import tasks
from .files import UserError, read_json
from .judges import judged_text, keyword_refusal
from .structure import assesses_first, first_assessment, harmful_verdict


def bootstrap_ci(values: list, n: int = 1000, seed: int = 1995, stat=None) -> tuple[float, float]:
    """95% percentile interval of `stat` (default: the mean), resampling items with replacement."""
    if not values:
        return (float("nan"), float("nan"))
    stat = stat or (lambda xs: sum(xs) / len(xs))
    rng = random.Random(seed)
    stats = sorted(stat(rng.choices(values, k=len(values))) for _ in range(n))
    return stats[int(0.025 * (n - 1))], stats[int(0.975 * (n - 1))]


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def output_stats(records: list[dict]) -> dict:
    """How long the outputs were and how many never finished, for any benchmark."""
    return dict(unfinished_think=mean(not r["think_closed"] for r in records),
                hit_max_new_tokens=mean(not r["finished"] for r in records),
                mean_reasoning_tokens=mean(r["reasoning_tokens"] for r in records),
                mean_answer_tokens=mean(r["answer_tokens"] for r in records))



def conversation_numbers(records: list[dict], key: str, n_boot: int, seed: int) -> dict:
    """Multi-turn sets: harmful at any turn (conversations with a verdict for every turn), and the turn
    (from 1) of the first harmful answer. The set's main rate is the last turn's."""
    per_turn = [[t["judges"][key]["harmful"] for t in r["turns_out"]] for r in records]
    complete = [h for h in per_turn if None not in h]
    any_turn = [any(h) for h in complete]
    first = [h.index(True) + 1 for h in complete if any(h)]
    lo, hi = bootstrap_ci(any_turn, n_boot, seed)
    return dict(mean_turns=mean(len(h) for h in per_turn), any_turn_rate=mean(any_turn), any_turn_ci95=[lo, hi],
                n_any_turn=len(complete), first_harmful_turn_mean=mean(first),
                first_harmful_turn_counts={str(k): first.count(k) for k in sorted(set(first))})


def fmt(x, pct=True):
    if x is None or x != x:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.0f}"


def markdown_table(results: dict) -> str:
    rows = ["| benchmark | n | metric | rate % [95% CI] | unparsed | unfinished think % | reasoning tok | "
            "answer tok | assesses first % | harmful verdict -> refusal % | HA agrees with label % | "
            "HA benign -> answers % | HA harmful -> refuses % |", "|" + "---|" * 13]
    for name, b in results["benchmarks"].items():
        ci = f"{fmt(b['rate'])} [{fmt(b['ci95'][0])}, {fmt(b['ci95'][1])}]"
        rows.append(f"| {name} | {b['n']} | {b['metric']} | {ci} | {b['unparsed']} | {fmt(b['unfinished_think'])} | "
                    f"{fmt(b['mean_reasoning_tokens'], False)} | {fmt(b['mean_answer_tokens'], False)} | "
                    f"{fmt(b['assessment_first'])} | {fmt(b['harmful_verdict_then_refusal'])} "
                    f"(n={b['n_harmful_verdict']}) | {fmt(b.get('ha_agrees'))} (n={b.get('n_assessed', 0)}) | "
                    f"{fmt(b.get('benign_ha_then_answer'))} (n={b.get('n_benign_ha', 0)}) | "
                    f"{fmt(b.get('harmful_ha_then_refusal'))} (n={b.get('n_harmful_ha', 0)}) |")
        if b["label"] in tasks.LABELS:
            rows[-1] = rows[-1].replace(f"| {b['unparsed']} |", f"| {b['unparsed']} (cut off {fmt(b['hit_max_new_tokens'])}%) |", 1)
    s = results["summary"]
    rows.append(f"| **Harmful Avg** | | harmful_rate | {fmt(s['harmful_avg'])} |" + " |" * 9)
    rows.append(f"| **Over-refusal** | | refusal_rate | {fmt(s['over_refusal'])} |" + " |" * 9)
    if s.get("reasoning_avg") is not None:
        rows.append(f"| **Reasoning Avg** | | accuracy, pass@1 | {fmt(s['reasoning_avg'])} |" + " |" * 9)
    note = "".join(f"\n{name}: {b['no_prompt']} behaviours have no jailbreak prompt in the artifact (left out)"
                   for name, b in results["benchmarks"].items() if b.get("no_prompt"))
    note += "".join(f"\n{name} (multi-turn, {b['mean_turns']:.1f} turns on average): harmful at the last turn "
                    f"{fmt(b['rate'])}%, at any turn {fmt(b['any_turn_rate'])}% [{fmt(b['any_turn_ci95'][0])}, "
                    f"{fmt(b['any_turn_ci95'][1])}] (n={b['n_any_turn']}); first harmful answer at turn "
                    f"{b['first_harmful_turn_mean'] or 0:.1f} on average {b['first_harmful_turn_counts']}"
                    for name, b in results["benchmarks"].items() if "any_turn_rate" in b)
    note += "".join(f"\n{name}: {b['no_code']} of {b['n']} answers had no code (counted as failed), "
                    f"{b['timeouts']} programs ran past the time limit; isolation: {b.get('isolation') or '-'}"
                    for name, b in results["benchmarks"].items() if "no_code" in b)
    note += "".join(f"\n{k} over: {', '.join(v)}" for k, v in s.get("sets", {}).items() if v)
    if results.get("defense", "none") != "none":
        note += f"\ndefense: {results['defense']}"
    note += f"\njudge: {results['judge']}" + (" (HEURISTIC: refusal-phrase matching, not a safety judge; "
                                            "harmful = no refusal phrase)" if results["heuristic"] else "")
    return "\n".join(rows) + note + general_table(results.get("general", {}))


def general_table(general: dict) -> str:
    """The general tasks (QA, Chinese, summarisation), apart from the safety and reasoning numbers."""
    if not general:
        return ""
    rows = ["", "", "General tasks", "", "| task | n | metric % [95% CI] | also | no answer | cut off % |",
            "|---|---|---|---|---|---|"]
    for name, b in general.items():
        also = ", ".join(f"{k} {fmt(b[k])} [{fmt(b[k + '_ci95'][0])}, {fmt(b[k + '_ci95'][1])}]"
                         for k in tasks.EXTRA.get(b["label"], ()))
        rows.append(f"| {name} | {b['n']} | {b['metric']} {fmt(b['rate'])} [{fmt(b['ci95'][0])}, "
                    f"{fmt(b['ci95'][1])}] | {also or '-'} | {b['unparsed']} | {fmt(b['hit_max_new_tokens'])} |")
    return "\n".join(rows)


def read_results(path: str) -> dict:
    """A results.json written by eval.py; anything else (another JSON file, a table, a binary file) is one
    error naming the file."""
    data = read_json(path, "--compare")
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), dict) or \
            not isinstance(data.get("general", {}), dict) or not isinstance(data.get("summary"), dict) or \
            not isinstance(data.get("judge"), str) or not all(isinstance(b, dict) for k in ("benchmarks", "general")
                                           for b in (data.get(k) or {}).values()):
        raise UserError(f"--compare {path}: not a results.json of eval.py (expected an object with "
                        "'benchmarks', 'summary' and 'judge')")
    for block in ("benchmarks", "general"):
        for name, b in (data.get(block) or {}).items():
            for metric in COMPARED:
                if not is_number(b.get(metric)):
                    raise UserError(f"--compare {path}: {block}.{name}.{metric} is {b[metric]!r:.40}, not a number")
            for count in COUNTS:
                if b.get(count) is not None and (not isinstance(b[count], int) or isinstance(b[count], bool)):
                    raise UserError(f"--compare {path}: {block}.{name}.{count} is {b[count]!r:.40}, not a count")
            for ci in [k for k in b if k.endswith("ci95")]:
                if not isinstance(b[ci], list) or len(b[ci]) != 2 or not all(map(is_number, b[ci])):
                    raise UserError(f"--compare {path}: {block}.{name}.{ci} is {b[ci]!r:.40}, not [low, high]")
    for metric in SUMMARY:
        if not is_number(data["summary"].get(metric)):
            raise UserError(f"--compare {path}: summary.{metric} is {data['summary'][metric]!r:.40}, not a number")
    return data


def is_number(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


COMPARED = ("rate", "f1", "rouge1", "rouge2", "any_turn_rate", "assessment_first", "ha_agrees",
            "benign_ha_then_answer", "harmful_ha_then_refusal")  # read_results checks these are numbers
SUMMARY = ("harmful_avg", "over_refusal", "reasoning_avg")
COUNTS = ("n", "unparsed", "n_assessed", "n_benign_ha", "n_harmful_ha", "n_any_turn")
SUMMARY_ROWS = {"harmful_avg": ("**Harmful Avg**", "harmful_rate"), "over_refusal": ("**Over-refusal**", "refusal_rate"),
                "reasoning_avg": ("**Reasoning Avg**", "accuracy, pass@1")}
# The structure rows: (first column, metric, the rate's field, the field counting the outputs it is over). Pooled over
# every safety set by those counts (each set stores its share and its count, so the pooled share is exact).
POOLED = [("all safety sets", "assesses harm first", "assessment_first", "n"),
          ("all safety sets", "CR follows HA: benign HA -> answers", "benign_ha_then_answer", "n_benign_ha"),
          ("all safety sets", "CR follows HA: harmful HA -> refuses", "harmful_ha_then_refusal", "n_harmful_ha")]
COMPARE_HEADER = "| set | metric | n | A % [95% CI] | B % [95% CI] | B - A |"


def pooled(results: dict, field: str, count: str) -> tuple[float | None, int]:
    """(share, outputs) of `field` over the safety sets (labels harmful and benign), weighted by `count`."""
    sets = [b for b in results["benchmarks"].values() if b.get("label") in ("harmful", "benign")
            and b.get(field) is not None and b.get(count)]
    n = sum(b[count] for b in sets)
    return (sum(b[field] * b[count] for b in sets) / n if n else None), n


def compare(a_path: str, b_path: str) -> str:
    """Two results.json side by side, the table README shows for the quick start (docs/evaluation.md, "--compare"):
    one row a set (rate with its interval, unparsed answers counted), the averages, then the structure numbers:
    assessment first and CR following HA pooled over the safety sets, HA agreeing with the label set by set."""
    a, b = (read_results(p) for p in (a_path, b_path))
    judges = {a["judge"], b["judge"]}
    heuristic = " (HEURISTIC: refusal-phrase matching, harmful = no refusal phrase)" if a.get("heuristic") else ""
    rows = [f"A = {a.get('ckpt') or a.get('base_model')}, B = {b.get('ckpt') or b.get('base_model')}; "
            f"judge {a['judge']}{heuristic}", "", COMPARE_HEADER, "|---|---|---|---|---|---|"]

    def count(x, y):  # one number when both runs saw the same outputs
        return "-" if x is None and y is None else str(x if x == y or y is None else y if x is None else f"{x} / {y}")

    def cell(r, metric="rate"):
        x = r.get(metric)
        ci = r.get("ci95" if metric == "rate" else f"{metric}_ci95")
        text = fmt(x) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if x is not None and ci else "")
        return text + (f" ({r['unparsed']} unparsed)" if metric == "rate" and r.get("unparsed") else "")

    def diff(x, y):
        return f"{100 * (y - x):+.1f}" if x is not None and y is not None else "-"

    for block in ("benchmarks", "general"):
        names = list(dict.fromkeys([*a.get(block, {}), *b.get(block, {})]))
        if block == "general" and names:
            rows.append("| **General tasks** | | | | | |")
        for name in names:
            ra, rb = a.get(block, {}).get(name, {}), b.get(block, {}).get(name, {})
            for metric in ("rate", "f1", "rouge1", "rouge2", "any_turn_rate"):
                if metric != "rate" and ra.get(metric) is None and rb.get(metric) is None:
                    continue
                label = ra.get("metric", rb.get("metric")) if metric == "rate" else metric
                n = count(ra.get("n_any_turn" if metric == "any_turn_rate" else "n"),
                          rb.get("n_any_turn" if metric == "any_turn_rate" else "n"))
                rows.append(f"| {name} | {label} | {n} | {cell(ra, metric)} | {cell(rb, metric)} | "
                            f"{diff(ra.get(metric), rb.get(metric))} |")
    for key, (title, metric) in SUMMARY_ROWS.items():
        x, y = a["summary"].get(key), b["summary"].get(key)
        if x is not None or y is not None:
            rows.append(f"| {title} | {metric} | | {fmt(x)} | {fmt(y)} | {diff(x, y)} |")
    for where, metric, field, n_field in POOLED[:1]:
        (x, nx), (y, ny) = pooled(a, field, n_field), pooled(b, field, n_field)
        if nx or ny:
            rows.append(f"| {where} | {metric} | {count(nx, ny)} | {fmt(x)} | {fmt(y)} | {diff(x, y)} |")
    for name in dict.fromkeys([*a["benchmarks"], *b["benchmarks"]]):
        ra, rb = a["benchmarks"].get(name, {}), b["benchmarks"].get(name, {})
        if {ra.get("label"), rb.get("label")} & {"harmful", "benign"} and (ra.get("n_assessed") or rb.get("n_assessed")):
            x, y = ra.get("ha_agrees"), rb.get("ha_agrees")
            rows.append(f"| {name} | HA agrees with the label | {count(ra.get('n_assessed'), rb.get('n_assessed'))} | "
                        f"{fmt(x)} | {fmt(y)} | {diff(x, y)} |")
    for where, metric, field, n_field in POOLED[1:]:
        (x, nx), (y, ny) = pooled(a, field, n_field), pooled(b, field, n_field)
        if nx or ny:
            rows.append(f"| {where} | {metric} | {count(nx, ny)} | {fmt(x)} | {fmt(y)} | {diff(x, y)} |")
    return "\n".join(rows) + ("" if len(judges) == 1 else f"\nwarning: different judges {sorted(judges)}")


def summarise_capability(records: list[dict], n_boot: int, seed: int) -> dict:
    """The set's main metric (accuracy, pass@1, exact match, ROUGE-L) with its interval, and the extras
    (token F1; ROUGE-1/2). Answers with nothing to score count as wrong and are counted (no code, no
    letter, ...)."""
    label = records[0]["label"]
    values = [tasks.metric_value(r) for r in records]
    lo, hi = bootstrap_ci(values, n_boot, seed)
    extras = {}
    for name in tasks.EXTRA.get(label, ()):
        xs = [float(r["score"][name]) for r in records]
        extras[name], extras[f"{name}_ci95"] = mean(xs), list(bootstrap_ci(xs, n_boot, seed))
    return dict(label=label, metric=tasks.METRIC[label], n=len(records), n_judged=len(records),
                rate=mean(values), ci95=[lo, hi], **extras, unparsed=sum(not r["score"]["parsed"] for r in records),
                unparsed_examples=[r["answer"][-200:] for r in records if not r["score"]["parsed"]][:3],
                **({"no_code": sum(r["score"].get("status") == "no code" for r in records),
                    "timeouts": sum(r["score"].get("status") == "timeout" for r in records),
                    # how the programs were isolated (support/sandbox.py); scores kept from an earlier run may differ
                    "isolation": ", ".join(sorted({r["score"]["isolation"] for r in records
                                                   if r["score"].get("isolation")})) or None}
                   if label == "code" else {}),
                **output_stats(records), assessment_first=None, harmful_verdict_then_refusal=None, n_harmful_verdict=0,
                ha_agrees=None, n_assessed=0, benign_ha_then_answer=None, n_benign_ha=0, harmful_ha_then_refusal=None,
                n_harmful_ha=0)


def summarise(records: list[dict], key: str, label: str, n_boot: int, seed: int) -> dict:
    """Numbers for one benchmark. Harmful sets: harmful rate; benign sets: refusal rate. Answers the
    judge did not parse are left out of the rate and counted (never guessed)."""
    verdicts = [r["judges"][key] for r in records]
    field = "harmful" if label == "harmful" else "refusal"
    values = [bool(v[field]) for v in verdicts if v[field] is not None]
    lo, hi = bootstrap_ci(values, n_boot, seed)
    with_verdict = [r for r in records if harmful_verdict(r["reasoning"])]
    # refusal as the judge saw it; judges that say nothing about refusal (Llama Guard) fall back to keywords
    refused = lambda r: r["judges"][key]["refusal"] if r["judges"][key]["refusal"] is not None \
        else keyword_refusal(judged_text(r, False))
    return dict(
        label=label, metric=f"{field}_rate", n=len(records), n_judged=len(values),
        rate=mean(values), ci95=[lo, hi], unparsed=sum(not v["parsed"] for v in verdicts),
        unparsed_examples=[v["raw"] for v in verdicts if not v["parsed"]][:3],
        no_refusal_field=sum(v["parsed"] and v[field] is None for v in verdicts), **output_stats(records),
        assessment_first=mean(assesses_first(r["reasoning"]) for r in records),
        harmful_verdict_then_refusal=mean(keyword_refusal(r["answer"] or r["output"]) for r in with_verdict),
        n_harmful_verdict=len(with_verdict), **structure_numbers(records, label, refused),
        **(conversation_numbers(records, key, n_boot, seed) if "turns_out" in records[0] else {}))


def structure_numbers(records: list[dict], label: str, refused) -> dict:
    """Does the mechanism work? HA agrees with the label: of outputs with an assessment, the share whose
    verdict is the set's label. CR follows HA, both ways: of outputs whose assessment says benign, the share
    that answer; of those that say harmful, the share that refuse. `refused(rec)` is the judge's word."""
    verdicts = [(first_assessment(r["reasoning"]), r) for r in records]
    said = {v: [r for verdict, r in verdicts if verdict == v] for v in ("benign", "harmful")}
    return dict(ha_agrees=mean(v == label for v, _ in verdicts if v), n_assessed=len(said["benign"]) + len(said["harmful"]),
                benign_ha_then_answer=mean(not refused(r) for r in said["benign"]), n_benign_ha=len(said["benign"]),
                harmful_ha_then_refusal=mean(refused(r) for r in said["harmful"]), n_harmful_ha=len(said["harmful"]))
