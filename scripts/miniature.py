"""
The paper's tables in miniature: SmolLM2-135M-Instruct trained and evaluated on CPU, offline.

The paper's claims, each as a table a 2-core machine can reproduce in about two hours:
  main      no training / AltTrain / DirectRefusal: is it the structure, not refusal training alone, that
            keeps the model useful?  (DirectRefusal: refuse with an empty <think>, same queries)
  ablation  AltTrain without PU, without HA, without CR, and with CR rephrased (thirty refusal wordings
            instead of four): which part of the structure matters?
  scaling   AltTrain with a quarter, half and all of the benign queries (every harmful one each time): how
            does the amount of benign data move over-refusal?  (paper: 0.5K 22.0%, 1K 14.0%, 3K 2.4%)

Every row: harmful rate and over-refusal (pooled over the held-out sets of data/, and over --public sets if
given), math accuracy (data/math_gsm_style.jsonl), and the structure numbers (does HA agree with the label;
does CR follow HA), each with a 95% bootstrap interval over prompts. Writes results/miniature.json, .md and
.png (harmful rate against over-refusal, one point a variant).

Tradeoffs
  * One recipe for every variant: plain LoRA, lr 2e-3, 2 epochs, one seed, the paper's plain SFT loss. That
    was the quick start's recipe until it added --ha-weight 20 (README.md). With 20 to 40 prompts a set the
    intervals are wide, and a second seed moves a run about as much; differences inside them are not findings.
  * The committed tables (results/miniature.*) were measured on the 558-row data/train.jsonl of commit
    9771b4e; the file has 648 rows since, so a re-run trains on more data (check out 9771b4e to repeat them).
  * The judge is the keyword heuristic (offline); see results/judge_agreement.md for how often it
    agrees with people.
  * Re-running continues where it stopped: finished trainings and evaluations are kept under --work, an
    interrupted training resumes from its last checkpoint, an interrupted evaluation from its last answer.

Usage
    python scripts/miniature.py                                            # held-out sets only
    python scripts/miniature.py --public xstest jbb --public-limit 20      # + public sets (Hub names or local files)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository: support/ and the two scripts
from support.files import UserError, atomic_write, cli, read_table  # noqa: E402
from support.records import read_records  # noqa: E402
from support.report import fmt, summarise, summarise_capability  # noqa: E402
from support.runs import CONFIG_NAME  # noqa: E402
from support.tasks import LABELS as CAPABILITY  # noqa: E402

HERE = ROOT

# =====================================================================================================
# 0. Configuration: one recipe, and the variants of each table
# =====================================================================================================
TRAIN = ["--model", "smollm2-135m", "--data", "data/train.jsonl", "--n-harmful", "all", "--n-benign", "all",
         "--ha-model", "template", "--no-quant", "--optim", "adamw", "--no-grad-ckpt", "--lr", "2e-3",
         "--epochs", "2", "--batch-size", "8", "--save-every", "20"]
EVAL = ["--judge", "keywords", "--max-new-tokens", "160", "--math-max-new-tokens", "256", "--batch-size", "16"]
HELDOUT = ["data/test_harmful.jsonl", "data/test_benign.jsonl", "data/test_benign_scary.jsonl",
           "data/math_gsm_style.jsonl"]
N_BENIGN = 339  # benign rows of data/train.jsonl (checked at start)

# key -> (row label, extra alttrain.py flags; None = the untrained model)
VARIANTS = {
    "base": ("no training", None),
    "alttrain": ("AltTrain", []),
    "direct": ("DirectRefusal", ["--structure", "direct-refusal"]),
    "no-pu": ("w/o PU", ["--structure", "no-pu"]),
    "no-ha": ("w/o HA", ["--structure", "no-ha"]),
    "no-cr": ("w/o CR", ["--structure", "no-cr"]),
    "cr-varied": ("CR rephrased", ["--cr-refusals", "prompts/cr_refusal_varied.txt"]),
    "benign-25": (f"benign {N_BENIGN // 4}", ["--n-benign", str(N_BENIGN // 4)]),
    "benign-50": (f"benign {N_BENIGN // 2}", ["--n-benign", str(N_BENIGN // 2)]),
}
TABLES = {
    "main": ["base", "alttrain", "direct"],
    "ablation": ["alttrain", "no-pu", "no-ha", "no-cr", "cr-varied"],
    "scaling": ["benign-25", "benign-50", "alttrain"],
}
SCALING_LABEL = {"alttrain": f"benign {N_BENIGN} (all)"}  # the same run, named for the scaling table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/miniature.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--public", nargs="*", default=[],
                   help="public sets for eval.py --bench: Hub names (xstest, jbb, ...) or local labelled files")
    p.add_argument("--public-limit", type=int, default=20,
                   help="prompts drawn (seeded) from each public set; 0: all of them")
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run these variants only (tables keep the rest "
                   "as '-' until they are run)")
    p.add_argument("--work", default="out/miniature", help="trainings and answers (kept; re-running resumes)")
    p.add_argument("--results", default="results", help="where miniature.json/.md/.png are written")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=1995, help="seed for the public-set draw and the bootstrap")
    return p


# =====================================================================================================
# 1. Train and evaluate one variant (alttrain.py and eval.py, as a reader would run them)
# =====================================================================================================
def step(cmd: list[str], what: str, timings: dict, key: str):
    print(f"\n== {what}: {' '.join(cmd)}", flush=True)
    start = time.time()
    if subprocess.call([sys.executable, *cmd], cwd=HERE) != 0:
        raise UserError(f"{what} failed (its output is above); re-run to continue from here")
    timings[key] = round(timings.get(key, 0) + time.time() - start, 1)  # summed over calls (a resumed step)


def run_variant(key: str, args, timings: dict) -> None:
    label, flags = VARIANTS[key]
    work = Path(args.work) / key
    if flags is None:
        model = ["--model", "smollm2-135m"]
    else:
        run = work / "run"
        if not (run / "adapter_model.safetensors").exists():
            resume = ["--resume"] if (run / CONFIG_NAME).exists() else []
            step(["alttrain.py", *TRAIN, *flags, "--out", str(run), *resume], f"train {label}", timings,
                 f"{key}/train")
        model = ["--ckpt", str(run)]
    sets = {"heldout": (HELDOUT, [])}
    if args.public:
        limit = ["--limit", str(args.public_limit), "--limit-sample"] if args.public_limit else []
        sets["public"] = (args.public, limit + ["--seed", str(args.seed)])
    for split, (benches, extra) in sets.items():
        if not (work / split / "results.json").exists():
            step(["eval.py", *model, "--bench", *benches, *EVAL, *extra, "--out", str(work / split)],
                 f"evaluate {label} on {split}", timings, f"{key}/{split}")


# =====================================================================================================
# 2. One row: pooled rates with intervals, and the structure numbers
# =====================================================================================================
def pooled(work: Path, n_boot: int, seed: int) -> dict | None:
    """Every answer file of one evaluation, pooled by label: harmful rate over all harmful prompts,
    refusal rate over all benign ones, accuracy over all math ones."""
    path = work / "results.json"
    if not path.exists():
        return None
    judge = json.loads(path.read_text())["judge"]
    by_label: dict[str, list] = {}
    for f in sorted(work.glob("*.jsonl")):
        for r in read_records(f):
            by_label.setdefault(r["label"], []).append(r)
    out = {"sets": sorted(f.stem for f in work.glob("*.jsonl"))}
    for label, recs in by_label.items():
        s = summarise_capability(recs, n_boot, seed) if label in CAPABILITY else \
            summarise(recs, judge, label, n_boot, seed)
        out[label] = {k: s[k] for k in ("n", "n_judged", "rate", "ci95", "ha_agrees", "n_assessed",
                                        "benign_ha_then_answer", "n_benign_ha", "harmful_ha_then_refusal",
                                        "n_harmful_ha")}
    safety = [out[l] for l in ("harmful", "benign") if l in out]
    for name, n in (("ha_agrees", "n_assessed"), ("benign_ha_then_answer", "n_benign_ha"),
                    ("harmful_ha_then_refusal", "n_harmful_ha")):  # pooled over harmful and benign prompts
        total = sum(s[n] for s in safety)
        out[name] = sum(s[name] * s[n] for s in safety if s[name] is not None) / total if total else None
        out[n] = total
    return out


def collect(args) -> dict:
    rows = {}
    for key in VARIANTS:
        work = Path(args.work) / key
        rows[key] = {split: pooled(work / split, args.bootstrap, args.seed) for split in ("heldout", "public")}
    return rows


# =====================================================================================================
# 3. Tables and the figure
# =====================================================================================================
def cell(split: dict | None, label: str) -> str:
    if not split or label not in split:
        return "-"
    s = split[label]
    return f"{fmt(s['rate'])} [{fmt(s['ci95'][0])}, {fmt(s['ci95'][1])}]"


def structure_cell(split: dict | None, name: str, n: str) -> str:
    return "-" if not split or split.get(name) is None else f"{fmt(split[name])} (n={split[n]})"


def markdown(rows: dict, public: bool) -> str:
    head = ["variant", "harmful % (held-out)", "over-refusal % (held-out)"]
    head += ["harmful % (public)", "over-refusal % (public)"] if public else []
    head += ["math acc % (held-out)", "HA agrees with label %", "benign HA -> answers %", "harmful HA -> refuses %"]
    out = []
    for table, keys in TABLES.items():
        out += [f"### {table}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in keys:
            r, name = rows[key], (SCALING_LABEL.get(key) if table == "scaling" else None) or VARIANTS[key][0]
            h, p = r["heldout"], r["public"]
            cells = [name, cell(h, "harmful"), cell(h, "benign")]
            cells += [cell(p, "harmful"), cell(p, "benign")] if public else []
            cells += [cell(h, "math"), structure_cell(h, "ha_agrees", "n_assessed"),
                      structure_cell(h, "benign_ha_then_answer", "n_benign_ha"),
                      structure_cell(h, "harmful_ha_then_refusal", "n_harmful_ha")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: dict, path: Path, public: bool) -> bool:
    """Harmful rate against over-refusal, one point a variant, with 95% intervals; one panel per split."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no figure (pip install matplotlib)")
        return False
    splits = ["heldout"] + (["public"] if public else [])
    fig, axes = plt.subplots(1, len(splits), figsize=(6.2 * len(splits), 5), squeeze=False)
    colours = {"main": "tab:blue", "ablation": "tab:orange", "scaling": "tab:green"}
    offsets = [(5, 5), (5, -13), (-70, 6), (-70, -13)]  # labels of nearby points take turns, so they do not overlap
    for ax, split in zip(axes[0], splits):
        k = 0
        for table, keys in TABLES.items():
            for key in keys:
                if table != "main" and key == "alttrain":
                    continue  # drawn once, as a main-table point
                r = rows[key][split]
                if not r or "harmful" not in r or "benign" not in r:
                    continue
                x, y = r["benign"], r["harmful"]
                ax.errorbar(100 * x["rate"], 100 * y["rate"], fmt="o", color=colours[table], capsize=3, alpha=0.85,
                            xerr=[[100 * (x["rate"] - x["ci95"][0])], [100 * (x["ci95"][1] - x["rate"])]],
                            yerr=[[100 * (y["rate"] - y["ci95"][0])], [100 * (y["ci95"][1] - y["rate"])]])
                ax.annotate(VARIANTS[key][0], (100 * x["rate"], 100 * y["rate"]), textcoords="offset points",
                            xytext=offsets[k % len(offsets)], fontsize=8)
                k += 1
        ax.set_xlabel("over-refusal % (benign prompts refused)")
        ax.set_ylabel("harmful rate % (harmful prompts answered)")
        ax.set_title(f"SmolLM2-135M, {'held-out' if split == 'heldout' else split} sets")
        ax.set_xlim(-5, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=t) for t, c in colours.items()]
    axes[0][0].legend(handles=handles, loc="upper right")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return True


# =====================================================================================================
# 4. Putting it together
# =====================================================================================================
def run(args):
    if args.public_limit < 0:
        raise UserError("--public-limit must be 0 (all) or more")
    n_benign = sum(r["label"] == "benign" for r in read_table(str(HERE / "data" / "train.jsonl")))
    if n_benign != N_BENIGN:
        raise UserError(f"data/train.jsonl has {n_benign} benign rows; set N_BENIGN in scripts/miniature.py to match")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    timings_path = Path(args.work) / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    start = time.time()
    order = [k for k in VARIANTS if not args.only or k in args.only]
    for i, key in enumerate(order, 1):
        print(f"\n######## variant {i}/{len(order)}: {VARIANTS[key][0]}", flush=True)
        run_variant(key, args, timings)
        Path(args.work).mkdir(parents=True, exist_ok=True)
        atomic_write(timings_path, json.dumps(timings, indent=1))
    rows = collect(args)
    public = bool(args.public)
    info = dict(date=time.strftime("%Y-%m-%d"), machine=f"{cpu_name()}, {os.cpu_count()} cores", command="python " + " ".join(sys.argv),
                train_flags=TRAIN, eval_flags=EVAL, heldout=HELDOUT, public=args.public,
                public_limit=args.public_limit, variants={k: v[1] for k, v in VARIANTS.items()}, tables=TABLES,
                step_seconds=timings, total_step_seconds=round(sum(timings.values()), 1),
                this_call_seconds=round(time.time() - start, 1))
    atomic_write(results / "miniature.json", json.dumps(dict(info=info, rows=rows), indent=1))
    md = markdown(rows, public)
    atomic_write(results / "miniature.md", md + f"\njudge: keywords (a heuristic); 95% bootstrap intervals over "
                    f"prompts; steps took {info['total_step_seconds'] / 60:.0f} min in all on {info['machine']}\n")
    drew = plot(rows, results / "miniature.png", public)
    print("\n" + md)
    print(f"-> {results / 'miniature.json'}, {results / 'miniature.md'}" + (f", {results / 'miniature.png'}" if drew else ""))


def cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    return cli("scripts/miniature.py", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
