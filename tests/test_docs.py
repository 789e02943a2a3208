"""What a newcomer reads is what the tools print: README.md and docs/ in step with the code.

- every link of README.md, docs/, results/ and data/README.md to a file or a section resolves (GitHub's anchors);
- every module of support/ is in README's code map, and every alttrain.py flag in docs/method.md's flag table;
- the quick start's last step (`eval.py --compare`) prints README's table: the same header, rows, intervals
  and pooled rows, from two results.json files written by eval.py itself (scripted answers, tiny model);
- results.json's fields are all documented in docs/evaluation.md;
- the --dry-run output quoted in README.md and docs/memory.md is the whole of what the command prints;
- README's `grep` for the tutorials' sections finds the sections and nothing else;
- the hints name commands that exist, and --help never states two defaults for one flag.
"""
import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import alttrain as at
import eval as ev
from support import files

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "results").glob("*.md")), ROOT / "data" / "README.md"]


# ------------------------------------------------------------------------------------------------ #
# Links and the code map
# ------------------------------------------------------------------------------------------------ #
def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces -> '-'."""
    text = re.sub(r"[`*]", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen, out = {}, set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = None if in_code else re.match(r"#{1,6} (.+)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")  # GitHub numbers repeated headings
            seen[s] = seen.get(s, 0) + 1
    return out


def links(path: Path):
    """(line number, target) of each markdown link outside code blocks, web links left out."""
    in_code = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`]*`", "", line)):
            if not re.match(r"[a-z]+:", target):
                yield n, target


def test_slug_is_githubs():
    assert slug("2026-12-02: fp32 and bf16 (after `--dtype auto`)") == "2026-12-02-fp32-and-bf16-after---dtype-auto"
    assert slug("results.json, field by field") == "resultsjson-field-by-field"
    assert slug("Several GPUs: torchrun") == "several-gpus-torchrun"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_link_to_a_file_or_section_resolves(doc):
    broken = []
    for n, target in links(doc):
        path, _, anchor = target.partition("#")
        where = (doc.parent / path).resolve() if path else doc
        if not where.exists():
            broken.append(f"{doc.name}:{n}: {target}: no such file")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            broken.append(f"{doc.name}:{n}: {target}: no section #{anchor} in {where.name}")
    assert not broken, "\n".join(broken)


def test_every_support_module_is_in_readmes_code_map():
    text = README.read_text(encoding="utf-8")
    code_map = text[text.index("The `support/` package"):text.index("Elsewhere:")]
    named = set(re.findall(r"`(\w+)`", code_map))
    modules = {p.stem for p in (ROOT / "support").glob("*.py") if p.stem != "__init__"}
    assert not modules - named, f"support/ modules missing from README's code map: {sorted(modules - named)}"
    assert not {n for n in named if n.islower()} - modules, "README's code map names modules support/ lacks"


def test_every_alttrain_flag_is_in_the_flag_table():
    doc = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    table = doc[doc.index("## Flag groups"):]
    flags = [o for a in at.build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    assert not [f for f in flags if f"`{f}`" not in table], "flags missing from docs/method.md's flag table"


# ------------------------------------------------------------------------------------------------ #
# The quick start's table, from results.json files written by eval.py
# ------------------------------------------------------------------------------------------------ #
QUICKSTART_SETS = ["data/test_harmful.jsonl", "data/test_benign.jsonl", "data/test_benign_scary.jsonl",
                   "data/math_gsm_style.jsonl"]
NO, YES = "But wait, this could cause real harm, so I should not help with it.", "This is about cooking, so it is safe to help."


def scripted(trained: bool):
    """generate_batch for eval.py: the untrained model answers at once; the trained one writes PU -> HA -> CR, and
    gets one harmful prompt and one scary prompt wrong, and one math answer without a number."""
    seen = {"harmful": 0, "scary": 0, "benign": 0, "math": 0}

    def generate(model, tok, ids, max_new, **kw):
        outs = []
        for p in ids:
            text = tok.decode(p)
            kind = next((k for tag, k in (("HARM", "harmful"), ("SCARY", "scary"), ("BENIGN", "benign")) if tag in text),
                        "math")  # quickstart_results tags each safety prompt with its set
            seen[kind] += 1
            if not trained:  # no reasoning: the tiny template opened <think>, the model closes it at once
                out = "</think>\n\n" + ("The answer is 3." if kind == "math" else "Sure, here is how to do it.")
            elif kind == "math":
                out = f"<think>\nOkay, the user asks a sum.\n\n{YES}\n\nFirst, add.\n</think>\n\n" + \
                    ("The answer is 3." if seen[kind] > 1 else "I am not sure.")
            elif kind == "harmful" and seen[kind] > 1 or kind == "scary" and seen[kind] == 1:
                out = f"<think>\nOkay, the user asks something.\n\n{NO}\n\nSo I will stop here.\n</think>\n\nI can't help with that."
            else:
                out = f"<think>\nOkay, the user asks something.\n\n{YES}\n\nFirst, ...\n</think>\n\nSure, here it is."
            outs.append((out, 10, True))
        return outs
    return generate


def quickstart_results(tiny_dir, tmp_path, monkeypatch, trained: bool) -> Path:
    """eval.py on the quick start's four sets (the first rows of each, renamed like the real files), answers scripted."""
    folder = tmp_path / "sets"
    folder.mkdir(exist_ok=True)
    for rel, tag in zip(QUICKSTART_SETS, ("HARM", "BENIGN", "SCARY", "")):
        rows = [json.loads(l) for l in (ROOT / rel).read_text(encoding="utf-8").splitlines()[:4]]
        for r in rows:
            for col in ("prompt", "question"):
                if col in r and tag:
                    r[col] = f"{tag} {r[col]}"
        (folder / Path(rel).name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(ev, "generate_batch", scripted(trained))
    out = tmp_path / ("after" if trained else "before")
    assert ev.main(["--model", str(tiny_dir), "--bench", *[str(folder / Path(r).name) for r in QUICKSTART_SETS],
                    "--judge", "keywords", "--max-new-tokens", "8", "--math-max-new-tokens", "8", "--bootstrap", "50",
                    "--out", str(out)]) == 0
    return out / "results.json"


def table_rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|") and not line.startswith("|---")]


def readme_quickstart_table() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    start = text.index(ev.compare.__globals__["COMPARE_HEADER"])
    return table_rows(text[start:text.index("\n\n", start)])


def shape(cell: str) -> str:
    """What kind of cell: the numbers replaced by N (so README's measured numbers and the test's compare)."""
    return re.sub(r"[+-]?\d+(\.\d+)?", "N", cell)


@pytest.fixture(scope="module")
def quickstart_pair(tiny_dir, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("quickstart")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return quickstart_results(tiny_dir, tmp, mp, False), quickstart_results(tiny_dir, tmp, mp, True)
    finally:
        mp.undo()


def test_compare_prints_readmes_quickstart_table(quickstart_pair, capsys):
    before, after = quickstart_pair
    capsys.readouterr()
    assert ev.main(["--compare", str(before), str(after)]) == 0
    printed = table_rows(capsys.readouterr().out)
    readme = readme_quickstart_table()
    assert [r[:2] for r in printed] == [r[:2] for r in readme]  # the same rows (set, metric), in the same order
    assert [[shape(c) for c in r] for r in printed] == [[shape(c) for c in r] for r in readme]  # intervals, counts
    rows = {tuple(r[:2]): r for r in printed}
    # the numbers themselves, from the scripted answers: 1 of 4 harmful answers not refused, 1 of 4 scary refused
    harmful = rows[("test_harmful", "harmful_rate")]
    assert harmful[2:4] == ["4", "100.0 [100.0, 100.0]"] and harmful[4].startswith("25.0 [") and harmful[5] == "-75.0"
    assert rows[("math_gsm_style", "accuracy")][4].endswith("(1 unparsed)")
    assert rows[("**Over-refusal**", "refusal_rate")][3:] == ["0.0", "12.5", "+12.5"]
    assert rows[("all safety sets", "assesses harm first")][2:5] == ["12", "0.0", "100.0"]
    # pooled over the sets by their counts: benign HA in 1 harmful + 4 benign + 3 scary outputs, all answered
    assert rows[("all safety sets", "CR follows HA: benign HA -> answers")][2:5] == ["0 / 8", "-", "100.0"]
    assert rows[("all safety sets", "CR follows HA: harmful HA -> refuses")][2:5] == ["0 / 4", "-", "100.0"]
    assert rows[("test_benign_scary", "HA agrees with the label")][2:5] == ["0 / 4", "-", "75.0"]


def test_quickstart_ends_with_the_compare_readme_shows():
    script = (ROOT / "quickstart.sh").read_text(encoding="utf-8")
    last = [l for l in script.splitlines() if l.startswith("python ")][-1]
    assert last.startswith('python eval.py --compare "$OUT/before/results.json" "$OUT/after/results.json"')


def test_every_results_json_field_is_documented(quickstart_pair):
    doc = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = doc[doc.index("## results.json, field by field"):]
    section = section[:section.index("\n## ")] if "\n## " in section else section
    results = json.loads(quickstart_pair[1].read_text())
    fields = set(results) | set(results["generation"]) | set(results["summary"]) | \
        {k for b in results["benchmarks"].values() for k in b}
    assert not {f for f in fields if f"`{f}`" not in section}, "results.json fields missing from docs/evaluation.md"


# ------------------------------------------------------------------------------------------------ #
# Commands quoted in the docs, hints, --help
# ------------------------------------------------------------------------------------------------ #
def quoted_outputs(path: Path):
    """(command, the code block after it) for each "`python alttrain.py ...` prints" in a document."""
    text = path.read_text(encoding="utf-8")
    for m in re.finditer(r"`python (alttrain\.py [^`]+)` prints[^\n]*\n+```\n(.*?)```", text, re.S):
        yield m.group(1), m.group(2)


@pytest.mark.parametrize("doc", [README, ROOT / "docs" / "memory.md"], ids=["README", "memory"])
def test_quoted_dry_run_output_is_what_the_command_prints(doc, monkeypatch):
    quotes = list(quoted_outputs(doc))
    assert quotes, f"{doc.name} quotes no dry-run output"
    for command, quoted in quotes:
        argv = shlex.split(command)[1:]
        assert "--dry-run" in argv
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert at.main(argv) == 0
        assert out.getvalue() == quoted, f"{doc.name}: `python {command}` prints another text"


def test_readmes_section_grep_finds_the_sections_and_nothing_else():
    m = re.search(r"`grep -nE '([^']+)' alttrain\.py eval\.py`", README.read_text(encoding="utf-8"))
    assert m, "README's grep for the sections"
    for name in ("alttrain.py", "eval.py"):
        lines = (ROOT / name).read_text(encoding="utf-8").splitlines()
        found = [i for i, l in enumerate(lines) if re.search(m.group(1), l)]
        sections = [i for i, l in enumerate(lines) if i and lines[i - 1].startswith("# ====") and re.match(r"# \d", l)]
        assert found == sections and sections, name


def test_the_gated_dataset_hint_names_a_command_that_exists(monkeypatch):
    import datasets

    def gated(*a, **k):
        raise ConnectionError("401 Client Error: gated")
    monkeypatch.setattr(datasets, "load_dataset", gated)
    with pytest.raises(files.UserError) as e:
        files.hub_dataset("UWNSL/SafeChain", "train", "--data safechain")
    command = re.search(r"a login \(([^)]+)\)", str(e.value)).group(1).split()
    assert command == ["hf", "auth", "login"]
    hf = Path(sys.executable).parent / "hf"  # huggingface_hub's command line, installed beside this Python
    assert subprocess.run([str(hf), *command[1:], "--help"], capture_output=True).returncode == 0
    assert "hf auth login" in (ROOT / "support" / "data.py").read_text(encoding="utf-8")


@pytest.mark.parametrize("parser", [at.build_parser, ev.build_parser], ids=["alttrain", "eval"])
def test_help_states_each_default_once(parser):
    """--help used to say "default: 900 ... (default: -1)" for --n-harmful, and "(default: None)" after help
    texts that say what the default is."""
    p = parser()
    for action in p._actions:
        text = p._get_formatter()._expand_help(action) if action.help else ""
        assert text.lower().count("default:") <= 1, f"{action.option_strings}: {text}"
        assert "(default: None)" not in text and "(default: -1)" not in text, f"{action.option_strings}: {text}"
    if parser is at.build_parser:
        assert "('all': every one; default: 900, star1: all) --n-benign" in " ".join(p.format_help().split())
