"""
The tasks with a right answer, for eval.py: how each is asked and how each answer is scored (no judge).

    label   sets                        asked for                          scored by
    math    GSM8K, MATH500, AIME24      a \\boxed{} answer                 math-verify (LaTeX/sympy equivalence)
    code    HumanEval                   the completed function             its tests, run in support/sandbox.py (pass@1)
    mc      MMLU                        a letter in \\boxed{}              the letter
    qa      NQ-open                     a short answer                     exact match and token F1 (SQuAD rules)
    zh-mc   CMMLU                       a letter, asked in Chinese         the letter
    summ    CNN/DailyMail               a short summary                    ROUGE-1/2/L F1 (Google's rouge-score)

math, code and mc make the paper's "Reasoning Avg"; qa, zh-mc and summ its general-task block.
Only the final answer after </think> is scored: an output cut off inside <think> has no answer.

Rows are recognised by their columns, so a local file of a dataset's own schema works like the Hub set:
HumanEval (task_id, prompt, test, entry_point), CNN/DailyMail (article, highlights), NQ-open (question, a
*list* of answers), multiple choice (question with choices or A/B/C/D columns, answer: letter or index),
math (question or problem, answer; GSM8K's '#### 72' answers are cut to the number).
"""
from __future__ import annotations

import json
import re
import string
from collections import Counter

from support.files import PROMPTS
REASONING, GENERAL = ("math", "code", "mc"), ("qa", "zh-mc", "summ")
LABELS = REASONING + GENERAL
METRIC = {"math": "accuracy", "mc": "accuracy", "zh-mc": "accuracy", "code": "pass@1", "qa": "exact_match",
          "summ": "rougeL"}
EXTRA = {"qa": ("f1",), "summ": ("rouge1", "rouge2")}  # reported beside the main metric
SCORE_VERSION = 2  # bump when scoring changes: stored scores of another version are recomputed (1: hand-written normaliser)
QUESTION_COLUMNS = ("question", "problem", "prompt", "query")
ANSWER_COLUMNS = ("answer", "final_answer", "reference_answer")


class TaskError(ValueError):
    """A row that is not a task of any known schema (eval.py turns it into a UserError naming the line)."""


def prompt_file(name: str) -> str:
    return (PROMPTS / name).read_text(encoding="utf-8").strip()


# =====================================================================================================
# 1. Rows -> items {id, prompt, label, reference, ...}
# =====================================================================================================
def column(row: dict, names) -> str | None:
    lower = {k.lower(): k for k in row}
    return next((lower[n] for n in names if n in lower), None)


def is_task_row(row: dict) -> bool:
    """Does this row carry a right answer (a task), rather than being a safety prompt?"""
    return bool(column(row, ANSWER_COLUMNS) or {"entry_point", "test"} <= set(row) or
                {"article", "highlights"} <= set(row))


def has_chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def as_list(value):
    """A JSON list, also when a CSV stored it as text."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value if isinstance(value, list) else None


def task_item(i: int, row: dict, prompt_column: str | None = None) -> dict:
    """One row of any schema above -> an item. Raises TaskError with what is missing."""
    if {"entry_point", "test", "prompt"} <= set(row):
        for col in ("prompt", "test", "entry_point"):
            if not isinstance(row[col], str) or not row[col].strip():
                raise TaskError(f"{col!r} must be non-empty text (HumanEval's schema), not {row[col]!r:.40}")
        return dict(id=i, label="code", task_id=row.get("task_id", str(i)), code_prompt=row["prompt"],
                    test=row["test"], entry_point=row["entry_point"], reference=row["entry_point"],
                    prompt=prompt_file("code_prompt.txt").format(prompt=row["prompt"].rstrip()))
    if {"article", "highlights"} <= set(row):
        return dict(id=i, label="summ", reference=str(row["highlights"]).strip(),
                    prompt=prompt_file("summ_prompt.txt").format(article=str(row["article"]).strip()))
    qcol = column(row, [prompt_column.lower()] if prompt_column else QUESTION_COLUMNS)
    acol = column(row, ANSWER_COLUMNS)
    if qcol is None or acol is None:
        raise TaskError(f"no question or answer column (found {', '.join(row)})")
    if isinstance(row[qcol], (list, dict)):
        raise TaskError(f"{qcol!r} must be text, not {type(row[qcol]).__name__}")
    question, answer = str(row[qcol] or "").strip(), row[acol]
    if not question or answer is None or str(answer).strip() == "":
        raise TaskError(f"empty {qcol!r} or {acol!r}")
    choices = as_list(row.get("choices")) or ([row[c] for c in "ABCD"] if all(c in row for c in "ABCD") else None)
    if choices:
        if str(answer).strip().isdigit() and int(answer) >= min(len(choices), 10):
            raise TaskError(f"answer {answer!r} is not the index of one of the {len(choices)} choices")
        letter = "ABCDEFGHIJ"[int(answer)] if str(answer).strip().isdigit() else str(answer).strip().upper()
        zh = has_chinese(question)
        body = question + "\n\n" + "\n".join(f"{'ABCDEFGHIJ'[k]}. {c}" for k, c in enumerate(choices))
        suffix = prompt_file("mc_suffix_zh.txt" if zh else "mc_suffix.txt")
        return dict(id=i, label="zh-mc" if zh else "mc", reference=letter, prompt=f"{body}\n\n{suffix}")
    if answers := as_list(answer):
        return dict(id=i, label="qa", reference=[str(a) for a in answers],
                    prompt=f"{question}\n\n{prompt_file('qa_suffix.txt')}")
    return dict(id=i, label="math", reference=str(answer).split("####")[-1].strip(),  # GSM8K: '#### 72'
                prompt=f"{question}\n\n{prompt_file('math_suffix.txt')}")


# =====================================================================================================
# 2. Math: math-verify, plus the two things it does not do for us
# =====================================================================================================
# math-verify parses LaTeX and plain expressions and compares them with sympy (1/2 = 0.5 = \dfrac{1}{2},
# 2\sqrt{2} = \sqrt{8}, {1,2} = {2,1}, 10\% = 0.1). It does not (a) pick the *last* of several \boxed{}
# (it reads them all as a set), nor (b) drop a unit written as a word ("18 dollars" becomes 18*d*o*l...).
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, braces matched (\\boxed{\\frac{1}{2}} -> \\frac{1}{2});
    None if there is none or its braces never close."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0 or (brace := text.find("{", start)) < 0:
        return None
    depth = 0
    for k in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[brace + 1:k].strip()
    return None


NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def strip_units(ans: str) -> str:
    """'18 dollars' -> '18', '\\$5 per hour' -> '5' (a number followed only by words)."""
    s = re.sub(r"\\text(?:bf|rm)?\{(.*?)\}", r"\1", ans.strip().strip("$").strip())
    m = re.fullmatch(r"\\?\$?\s*(" + NUMBER + r")\s*[a-zA-Z][a-zA-Z .]*", s)
    return m.group(1) if m else ans


def _parse(text: str):
    from math_verify import parse
    return parse(text)


def extract_math(text: str) -> str | None:
    """The final answer: the last \\boxed{} value; else what math-verify finds in the text ('The answer is
    32 - 1/4.' -> '32 - 1/4', not the last number). None: no answer."""
    if (boxed := last_boxed(text)) is not None:
        return boxed
    found = _parse(text)
    return str(found[-1]).strip().rstrip(".").strip() if found else None  # the sentence's period is not the answer's


def math_equal(pred: str, ref: str) -> bool:
    """Equal as mathematics (math-verify), each side read as LaTeX first."""
    from math_verify import verify
    gold = _parse(f"${strip_units(ref)}$") or _parse(ref)
    answer = _parse(f"${strip_units(pred)}$") or _parse(pred)
    return bool(gold and answer and verify(gold, answer))


# =====================================================================================================
# 3. Multiple choice (English and Chinese)
# =====================================================================================================
def extract_letter(text: str) -> str | None:
    """\\boxed{C}, 'answer is (C)', '答案是C', or a lone letter. None: no choice stated."""
    boxed = last_boxed(text)
    letter = re.sub(r"\\text\{(.*?)\}", r"\1", boxed) if boxed is not None else ""
    if m := re.match(r"^\(?([A-J])\)?(?:[.:)]|\s|$)", letter):
        return m.group(1)
    m = re.search(r"answer(?: is)?\s*[:\s]\s*\(?([A-J])\)?\b", text, flags=re.I) or \
        re.search(r"答案\s*(?:是|为|應為|应为)?\s*[:：]?\s*[(（]?([A-J])\b", text) or \
        re.fullmatch(r"\s*\(?([A-J])\)?[.)。]?\s*", text)
    return m.group(1) if m else None


# =====================================================================================================
# 4. Code: the function from the final answer, run against the problem's tests
# =====================================================================================================
def extract_code(answer: str, entry_point: str) -> str | None:
    """The code in the final answer: the last fenced block that defines `entry_point` (else the last fenced
    block; a fence left open by the token limit runs to the end); with no fence, the function itself from
    its `def` to the end of its indented body. None: no code."""
    fences = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", answer, flags=re.S | re.I)
    if fences:
        defining = [b for b in fences if defines(b, entry_point)]
        return (defining or fences)[-1]
    if m := re.search(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*)$", answer, flags=re.S | re.I):
        return m.group(1)
    if m := re.search(rf"^(?:from .+|import .+\n)*def\s+{re.escape(entry_point)}\s*\(", answer, flags=re.M):
        lines, body = answer[m.start():].splitlines(), []
        for k, line in enumerate(lines):
            if k > 0 and line.strip() and not line[0].isspace() and \
                    not re.match(r"(def |class |@|import |from |\)|\]|\})", line):
                break  # prose after the function
            body.append(line)
        return "\n".join(body).rstrip() + "\n"
    return None


def defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, flags=re.M) is not None


def code_program(item: dict, code: str) -> str:
    """The program to run: the prompt's lines before the function (imports, helpers) + the model's
    function, or the whole prompt + a body when the model wrote only the body; then the tests."""
    prompt, entry = item["code_prompt"], item["entry_point"]
    if defines(code, entry):
        m = re.search(rf"^def\s+{re.escape(entry)}\s*\(", prompt, flags=re.M)
        program = (prompt[:m.start()] if m else "") + code
    else:
        program = prompt + code
    return f"{program}\n\n{item['test']}\n\ncheck({entry})\n"


# =====================================================================================================
# 5. Short answers (SQuAD's rules) and summaries (ROUGE)
# =====================================================================================================
def squad_normalise(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces: SQuAD's official rules."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = squad_normalise(pred).split(), squad_normalise(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g:
        return float(p == g)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def short_answer(answer: str) -> str:
    """The first non-empty line of the final answer, without an 'Answer:' lead or a trailing period."""
    line = next((l.strip() for l in answer.splitlines() if l.strip()), "")
    return re.sub(r"^(?:\*\*)?(?:final )?answer(?:\*\*)?\s*[:：]\s*", "", line, flags=re.I).strip().rstrip(".")


_ROUGE = None


def rouge(pred: str, ref: str) -> dict:
    """ROUGE-1/2/L F1, with Porter stemming as in the CNN/DailyMail literature."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer
        _ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    return {k: v.fmeasure for k, v in _ROUGE.score(ref, pred).items()}


# =====================================================================================================
# 6. One record -> its score
# =====================================================================================================
def score(rec: dict, limits=None) -> dict:
    """{pred, parsed, correct, ...} for one answered item. `limits`: sandbox.Limits for code."""
    label, ref = rec["label"], rec["reference"]
    text = rec["answer"] if rec["think_closed"] else ""
    if label == "code":
        from . import sandbox
        code = extract_code(text, rec["entry_point"]) if text else None
        if code is None:
            return dict(pred=None, parsed=False, correct=False, status="no code")
        result = sandbox.run_program(code_program(rec, code), limits)
        return dict(pred=code, parsed=True, correct=result.passed, status=result.status,
                    seconds=result.seconds, output=result.output[-500:], isolation=result.isolation)
    if label == "qa":
        pred = short_answer(text) if text else ""
        return dict(pred=pred, parsed=bool(pred), correct=bool(pred) and any(
            squad_normalise(pred) == squad_normalise(g) for g in ref),
                    f1=max((token_f1(pred, g) for g in ref), default=0.0) if pred else 0.0)
    if label == "summ":
        pred = text.strip()
        return dict(pred=pred[:300], parsed=bool(pred), correct=None,
                    **(rouge(pred, ref) if pred else dict(rouge1=0.0, rouge2=0.0, rougeL=0.0)))
    if label in ("mc", "zh-mc"):
        pred = extract_letter(text) if text else None
        return dict(pred=pred, parsed=pred is not None, correct=pred == ref)
    pred = extract_math(text) if text else None
    return dict(pred=pred, parsed=pred is not None, correct=pred is not None and math_equal(pred, ref))


def metric_value(rec: dict) -> float:
    """The number the set's main metric averages."""
    s = rec["score"]
    return float(s["rougeL"]) if rec["label"] == "summ" else float(bool(s["correct"]))
