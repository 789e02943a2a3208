"""
Generation through HF generate() against generation through a local OpenAI-compatible server
(`transformers serve`, support/api.py), on the quick start's held-out sets: answers/s of each path, and whether
the answers and the table are the same.

Both paths run eval.py itself (keywords judge, greedy, fp32, the quick start's token limits) into two folders:
  hf    python eval.py --model M --bench SETS ... --batch-size B
  api   transformers serve M --device cpu --dtype float32 on 127.0.0.1 (started and stopped here), then
        python eval.py --model M --bench SETS ... --engine api --api-base URL --api-model M --api-concurrency C
On CPU a server is no faster (it runs one request at a time unless started with --continuous-batching); the
point is that the path is real and measured. Needs `pip install "transformers[serving]"`.

    python bench/bench_api.py --model smollm2-135m --limit 5       # 5 prompts of each of the 4 sets
    python bench/bench_api.py --model tiny
Results: printed, and bench/results/api.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import re
import tempfile
import time
import urllib.request
from pathlib import Path

import common as c

SETS = ["data/test_harmful.jsonl", "data/test_benign.jsonl", "data/test_benign_scary.jsonl", "data/math_gsm_style.jsonl"]


def eval_cmd(model: str, out: Path, args, *extra) -> list[str]:
    cmd = [sys.executable, str(c.ROOT / "eval.py"), "--model", model, "--bench", *[str(c.ROOT / s) for s in SETS],
           "--judge", "keywords", "--max-new-tokens", str(args.max_new_tokens), "--math-max-new-tokens",
           str(args.math_max_new_tokens), "--dtype", "fp32", "--out", str(out), "--bootstrap", "200", *extra]
    return cmd + (["--limit", str(args.limit)] if args.limit else [])


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds of the whole command, seconds eval.py reports for generation alone, summed over the sets)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, cwd=c.ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                         stdout=subprocess.PIPE, text=True).stdout
    print(out)
    return time.perf_counter() - t0, sum(float(m) for m in re.findall(r": \d+ answers in ([\d.]+)s", out))


def serve(model: str, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    if cli is None:
        sys.exit('no `transformers` CLI: pip install "transformers[serving]"')
    proc = subprocess.Popen([cli, "serve", model, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--dtype", "float32"], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_UPDATE_CHECK="1"),
                            start_new_session=True)
    t0 = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc, f"http://127.0.0.1:{port}/v1", time.perf_counter() - t0
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 300:
                sys.exit(f"transformers serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)


def answers(folder: Path) -> dict:
    return {(p.stem, r["id"]): (r["output"], r["new_tokens"]) for p in sorted(folder.glob("*.jsonl"))
            for r in map(json.loads, open(p))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", default="smollm2-135m", help="'tiny', an alttrain alias or a model folder")
    p.add_argument("--limit", type=int, default=None, help="first N prompts of each set (default: all 100)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="the quick start's")
    p.add_argument("--math-max-new-tokens", type=int, default=256, help="the quick start's")
    p.add_argument("--batch-size", type=int, default=40, help="HF path: the quick start's")
    p.add_argument("--api-concurrency", type=int, default=8)
    args = p.parse_args(argv)
    model = str(Path(c.model_path(args.model)).resolve()) if Path(args.model).exists() else c.model_path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (t_hf, g_hf) = timed(eval_cmd(model, tmp / "hf", args, "--batch-size", str(args.batch_size)))
        proc, base, t_start = serve(model, tmp / "serve.log")
        try:
            (t_api, g_api) = timed(eval_cmd(model, tmp / "api", args, "--engine", "api", "--api-base", base, "--api-model",
                                   model, "--api-concurrency", str(args.api_concurrency)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        hf, api = answers(tmp / "hf"), answers(tmp / "api")
        same = sum(hf[k] == api.get(k) for k in hf)
        tables = [json.loads((tmp / d / "results.json").read_text()) for d in ("hf", "api")]
        rates = [{n: b["rate"] for n, b in t["benchmarks"].items()} for t in tables]
        tokens = sum(n for _, n in hf.values())
    n = len(hf)
    result = dict(machine=c.machine(), model=args.model, limit=args.limit, answers=n, new_tokens_hf=tokens,
                  max_new_tokens=args.max_new_tokens, math_max_new_tokens=args.math_max_new_tokens,
                  hf=dict(seconds=round(t_hf, 1), generation_s=round(g_hf, 1), answers_per_s=round(n / g_hf, 3),
                          batch_size=args.batch_size),
                  api=dict(seconds=round(t_api, 1), generation_s=round(g_api, 1), answers_per_s=round(n / g_api, 3),
                           server_start_s=round(t_start, 1),
                           concurrency=args.api_concurrency, prompt_mode=tables[1].get("api_prompt")),
                  same_answers=same, same_rates=rates[0] == rates[1], rates_hf=rates[0], rates_api=rates[1])
    print(f"{n} answers ({args.model}, limit {args.limit}), generation alone: HF generate {g_hf:.1f} s = "
          f"{n / g_hf:.2f} answers/s (batch {args.batch_size}); server {g_api:.1f} s = {n / g_api:.2f} answers/s "
          f"(concurrency {args.api_concurrency}). Whole commands: {t_hf:.1f} s / {t_api:.1f} s (+ server start "
          f"{t_start:.1f} s)")
    print(f"same answers: {same}/{n}; same rates: {rates[0] == rates[1]}\n  hf  {rates[0]}\n  api {rates[1]}")
    c.save("api.json", result)


if __name__ == "__main__":
    main()
