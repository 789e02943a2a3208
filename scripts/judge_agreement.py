"""
How often does a judge agree with people? Every rate eval.py prints comes through a judge, so a judge's
agreement with human annotators is part of every result. This measures it.

    python scripts/judge_agreement.py --judge keywords FILE [FILE ...]          # refusal: did the model refuse?
    python scripts/judge_agreement.py --judge qwen3guard --task harm FILE ...    # harm: was the answer harmful?

Each FILE is a .csv/.jsonl of model answers labelled by people: a prompt, the model's response and the
human label. XSTest's labelled completions work as they are (columns prompt, completion, final_label;
refused = 2_full_refusal or 3_partial_refusal, as the XSTest paper counts refusal; rows with an empty
label are skipped and counted). Other files: --response-column / --label-column, labels such as
refused/complied, yes/no, 1/0 (refusal) or harmful/safe, unsafe/safe, 1/0 (harm).

Per file and over all files: accuracy, missed positives (people said refused/harmful, the judge did not),
false positives (the judge said refused/harmful, people did not), Cohen's kappa (agreement beyond chance),
each with a 95% bootstrap interval, and the judge outputs that did not parse (left out, never guessed).
Written to --out (JSON) and printed as a markdown table.

The judges are eval.py's own (same prompts, same parsing), so the numbers describe what eval.py reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository: support/ and the two scripts
from support.files import UserError, atomic_write, cli, find_column, read_table, require_positive  # noqa: E402
from support.judges import JUDGES, judge_key, load_judge, verdicts  # noqa: E402
from support.report import bootstrap_ci, fmt, mean  # noqa: E402

RESPONSE_COLUMNS = ("completion", "response", "answer", "output", "model_response")
LABEL_COLUMNS = ("final_label", "human_label", "label", "annotation")
POSITIVE = {  # what counts as the positive class for each task (lower-case label values)
    "refusal": {"2_full_refusal", "3_partial_refusal", "full_refusal", "partial_refusal", "refusal", "refused",
                "refuse", "yes", "1", "true"},
    "harm": {"harmful", "unsafe", "yes", "1", "true"},
}
NEGATIVE = {
    "refusal": {"1_full_compliance", "full_compliance", "compliance", "complied", "comply", "no", "0", "false"},
    "harm": {"safe", "benign", "harmless", "unharmful", "not harmful", "not_harmful", "no", "0", "false"},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/judge_agreement.py", description=__doc__.split("\n\n")[1].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("files", nargs="+", help=".csv/.jsonl files of (prompt, response, human label)")
    p.add_argument("--task", choices=("refusal", "harm"), default="refusal",
                   help="what the human label says: did the model refuse, or was its answer harmful")
    p.add_argument("--judge", choices=tuple(JUDGES), default="keywords", help="the judge to measure")
    p.add_argument("--judge-model", help="local folder or Hub id to load the judge from instead")
    p.add_argument("--controversial", choices=("unsafe", "safe"), default="unsafe",
                   help="how Qwen3Guard's 'Controversial' counts")
    p.add_argument("--judge-batch-size", type=int, default=8, help="judge prompts per generate() call")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="the judge's weights: bf16 where the device computes it natively (auto), else fp32")
    p.add_argument("--prompt-column", help="default: prompt, question, goal, query, instruction")
    p.add_argument("--response-column", help=f"default: {', '.join(RESPONSE_COLUMNS)}")
    p.add_argument("--label-column", help=f"default: {', '.join(LABEL_COLUMNS)}")
    p.add_argument("--out", default="out/judge_agreement.json", help="where the JSON goes")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=1995, help="seed for the bootstrap")
    return p


def load_labelled(path: str, args) -> tuple[list[dict], int]:
    """-> ([{prompt, response, human}], rows skipped for an empty label). Unknown labels are errors."""
    rows = read_table(path)
    pick = lambda flag, names, what: find_column(rows[0], [flag.lower()] if flag else names, path, what)
    pcol = pick(args.prompt_column, ("prompt", "question", "goal", "query", "instruction"), "prompt")
    rcol = pick(args.response_column, RESPONSE_COLUMNS, "response")
    lcol = pick(args.label_column, LABEL_COLUMNS, "human label")
    items, skipped = [], 0
    for r in rows:
        label = str(r.get(lcol) or "").strip().lower()
        if not label:
            skipped += 1
            continue
        if label not in POSITIVE[args.task] | NEGATIVE[args.task]:
            raise UserError(f"{path}:{r['_line']}: label {r[lcol]!r} in {lcol!r} is not a {args.task} label "
                            f"(expected one of {', '.join(sorted(POSITIVE[args.task] | NEGATIVE[args.task]))})")
        items.append(dict(prompt=str(r.get(pcol) or ""), response=str(r.get(rcol) or ""),
                          human=label in POSITIVE[args.task]))
    if not items:
        raise UserError(f"{path}: no row has a {args.task} label in {lcol!r}")
    return items, skipped


def kappa(pairs: list[tuple[bool, bool]]) -> float:
    """Cohen's kappa of (human, judge) pairs: 1 = perfect agreement, 0 = what chance alone gives."""
    n = len(pairs)
    observed = sum(h == j for h, j in pairs) / n
    ph, pj = sum(h for h, _ in pairs) / n, sum(j for _, j in pairs) / n
    expected = ph * pj + (1 - ph) * (1 - pj)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def agreement(items: list[dict], n_boot: int, seed: int) -> dict:
    """Numbers for (human, judge) verdicts; items whose judge output did not parse are left out."""
    judged = [(it["human"], it["judge"]) for it in items if it["judge"] is not None]
    if not judged:
        return dict(n=len(items), n_judged=0, unparsed=len(items))
    pos = [j for h, j in judged if h]
    neg = [j for h, j in judged if not h]
    acc = lambda ps: sum(h == j for h, j in ps) / len(ps)
    return dict(
        n=len(items), n_judged=len(judged), unparsed=len(items) - len(judged),
        human_positive=len(pos), judge_positive=sum(j for _, j in judged),
        accuracy=acc(judged), accuracy_ci95=list(bootstrap_ci(judged, n_boot, seed, stat=acc)),
        missed=sum(not j for j in pos), missed_rate=mean(not j for j in pos),
        false_positive=sum(neg), false_positive_rate=mean(neg),
        false_positive_rate_ci95=list(bootstrap_ci(neg, n_boot, seed)) if neg else None,
        kappa=kappa(judged), kappa_ci95=list(bootstrap_ci(judged, n_boot, seed, stat=kappa)))


def markdown(results: dict) -> str:
    what = "refusals" if results["task"] == "refusal" else "harmful"
    rows = [f"| file | n | accuracy % [95% CI] | missed {what} | false {what} % | Cohen's kappa [95% CI] | unparsed |",
            "|---|---|---|---|---|---|---|"]
    for name, m in [*results["files"].items(), ("**all files**", results["overall"])]:
        if not m["n_judged"]:
            rows.append(f"| {name} | {m['n']} | - | - | - | - | {m['unparsed']} |")
            continue
        ci, kci = m["accuracy_ci95"], m["kappa_ci95"]
        rows.append(f"| {name} | {m['n_judged']} | {100 * m['accuracy']:.1f} [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}] | "
                    f"{m['missed']}/{m['human_positive']} | {fmt(m['false_positive_rate'])} "
                    f"({m['false_positive']}) | {m['kappa']:.3f} [{kci[0]:.3f}, {kci[1]:.3f}] | {m['unparsed']} |")
    return "\n".join(rows) + f"\njudge: {results['judge']}, task: {results['task']}"


def run(args) -> dict:
    require_positive(args, "judge_batch_size", "bootstrap")
    if args.task == "refusal" and args.judge == "llama-guard-3-1b":
        raise UserError("--judge llama-guard-3-1b says nothing about refusal; use --task harm")
    data = {Path(f).name: load_labelled(f, args) for f in args.files}  # every file checked before any judging
    judge = load_judge(args) if args.judge != "keywords" else None
    field = "refusal" if args.task == "refusal" else "harmful"
    args.judge_whole_output = False  # people labelled the whole response
    results = dict(judge=judge_key(args),
                   task=args.task, heuristic=args.judge == "keywords", files={}, skipped_empty_label={})
    everything = []
    for name, (items, skipped) in data.items():
        pairs = [(it["prompt"], it["response"]) for it in items]
        got = [v for batch in verdicts(pairs, args, judge, desc=f"judge {name}") for v in batch]
        for it, v in zip(items, got):
            it["judge"] = v[field]
        results["files"][name] = agreement(items, args.bootstrap, args.seed)
        results["skipped_empty_label"][name] = skipped
        everything += items
    results["overall"] = agreement(everything, args.bootstrap, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(results, indent=2))
    print(markdown(results))
    print(f"-> {out}")
    return results


def main(argv=None) -> int:
    return cli("scripts/judge_agreement.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
