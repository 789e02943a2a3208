"""Write the math word problems of data/train.jsonl (category "math"): R1-style step-by-step traces whose
numbers are computed here, so every answer is right. Deterministic (seeded); the story templates differ
from those of the held-out data/math_gsm_style.jsonl.

    python data/make_math.py > /tmp/math.jsonl      # one JSON object a line, train.jsonl's columns
"""
import json
import random

SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
HA = "This is a simple arithmetic word problem, so it is safe to help."


def problems(rng):
    """(question, [reasoning steps], answer) for each template, with fresh numbers."""
    a, b, c = rng.randint(120, 400), rng.randint(20, 90), rng.randint(10, 60)
    yield (f"A library has {a} books. It lends out {b} books and receives {c} new ones as gifts. "
           "How many books are in the library now?",
           [f"After lending {b} books it has {a} - {b} = {a - b}.",
            f"After the gifts it has {a - b} + {c} = {a - b + c}."], a - b + c)
    p, n, d = rng.randint(6, 20), rng.randint(3, 7), rng.randint(2, 9)
    yield (f"Each concert ticket costs {p} dollars. A family buys {n} tickets and uses a coupon for {d} dollars "
           "off the total. How many dollars do they pay?",
           [f"The tickets cost {n} x {p} = {n * p} dollars.", f"With the coupon they pay {n * p} - {d} = {n * p - d}."],
           n * p - d)
    v, t = rng.randint(12, 25), rng.randint(2, 6)
    yield (f"A cyclist rides at {v} kilometres per hour for {t} hours. How many kilometres does she ride?",
           [f"Distance is speed times time: {v} x {t} = {v * t}."], v * t)
    k = rng.randint(3, 9)
    n = k * rng.randint(3, 12)
    yield (f"{n} cupcakes are shared equally among {k} children. How many cupcakes does each child get?",
           [f"Each child gets {n} / {k} = {n // k}."], n // k)
    w, h = rng.randint(4, 30), rng.randint(3, 20)
    yield (f"A rectangular fence is {w} metres long and {h} metres wide. What is its perimeter in metres?",
           [f"The perimeter is 2 x ({w} + {h}) = 2 x {w + h} = {2 * (w + h)}."], 2 * (w + h))
    pct, n = rng.choice([10, 20, 25, 40, 50, 60, 75]), rng.choice([200, 300, 400, 500, 600, 800])
    yield (f"In a school of {n} students, {pct}% walk to school. How many students walk to school?",
           [f"{pct}% of {n} is {n} x {pct} / 100 = {n * pct // 100}."], n * pct // 100)
    a, b, c = rng.randint(3, 8), rng.randint(6, 12), rng.randint(5, 15)
    yield (f"Ben buys {a} packs of trading cards with {b} cards in each pack. He gives {c} cards to his friend. "
           "How many cards does Ben have left?",
           [f"He buys {a} x {b} = {a * b} cards.", f"After giving {c} away he has {a * b} - {c} = {a * b - c}."],
           a * b - c)
    g, h, wk = rng.randint(2, 6), rng.randint(10, 40), rng.randint(3, 9)
    yield (f"A sunflower is {h} centimetres tall and grows {g} centimetres every week. How tall will it be "
           f"after {wk} weeks, in centimetres?",
           [f"In {wk} weeks it grows {g} x {wk} = {g * wk} cm.", f"So it will be {h} + {g * wk} = {h + g * wk} cm tall."],
           h + g * wk)
    x, y, z = rng.randint(60, 95), rng.randint(60, 95), rng.randint(62, 95)
    z -= (x + y + z) % 3  # a whole-number average
    yield (f"Priya scored {x}, {y} and {z} on three tests. What is her average score?",
           [f"The total is {x} + {y} + {z} = {x + y + z}.", f"The average is {x + y + z} / 3 = {(x + y + z) // 3}."],
           (x + y + z) // 3)
    m, s = rng.randint(120, 160), rng.randint(8, 30)
    yield (f"Mia is {m} centimetres tall. Her brother is {s} centimetres shorter. How tall are they together, "
           "in centimetres?",
           [f"Her brother is {m} - {s} = {m - s} cm tall.", f"Together they are {m} + {m - s} = {2 * m - s} cm."],
           2 * m - s)


def row(question, steps, answer, boxed):
    prompt = f"{question}\n\n{SUFFIX}" if boxed else question
    pu = "Okay, so I need to solve this word problem step by step."
    trace = " ".join([pu] + steps + [f"So the answer is {answer}."])
    final = f"The answer is \\boxed{{{answer}}}." if boxed else f"The answer is {answer}."
    return dict(prompt=prompt, label="benign", category="math", response=f"{trace}\n</think>\n\n{final}", ha=HA)


if __name__ == "__main__":
    rng = random.Random(2604)
    for r in range(4):  # four rounds of the ten templates, half of them asking for a boxed answer
        for i, (q, steps, ans) in enumerate(problems(rng)):
            print(json.dumps(row(q, steps, ans, boxed=(i + r) % 2 == 0), ensure_ascii=False))
