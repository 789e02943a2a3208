"""
AltTrain: safety alignment of reasoning models by changing their reasoning *structure*.

Reference implementation of "Reasoning Structure Matters for Safety Alignment of Reasoning Models"
(In, Kim, Park, Park; ACL 2026, arXiv 2604.18946). Read it top to bottom: the sections follow the paper.
What is not the method (files, the run folder and checkpoints, the offline model, memory checks) is in
the support/ package, out of the way.

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
  * bf16 where the device computes it natively (--dtype auto: CUDA since Ampere, CPUs with AMX, or with
    AVX512-BF16 where a short matmul probe finds bf16 faster): the forward under torch.autocast over bf16
    base weights; LoRA weights, gradients, optimiser state and the loss stay fp32. Elsewhere fp32. On CPU
    the loop uses eager attention (--attention auto: faster than PyTorch's CPU SDPA backward at short
    lengths), on CUDA SDPA; in bf16 on CPU it pads micro-batch lengths to a multiple of 16
    (support/machine.py: pad_multiple says why).
  * Steps are formed at --batch-size; a micro-batch only splits a step (gradients add up), so micro-batches
    of 8, 2 or 1 are the same training. Micro-batches are packed by tokens from the memory plan: a 12K-token
    trace trains alone, the short refusals of its step together. Every example trains, as in R1-Act (no
    length cap; --max-len drops longer examples, --max-len with --truncate cuts them, never by default). The LM head + loss run in chunks of --loss-chunk positions,
    recomputed in backward, so a batch of long traces never holds all its vocabulary-wide logits.
  * A memory plan from the backbone's dims (in the alias table: no download) before anything is loaded,
    again after tokenisation with the real lengths: it picks the micro-batch, or refuses in seconds with
    the fix (an example too long for the GPU: how many, and the --max-len to pass). --dry-run prints it
    (--gpu-memory-gib plans for a GPU you do not have; with a local --data, from the real lengths).
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
    without a <think> block gives no reasoning to keep: see docs/method.md, Self-traces, for what that changes.

Usage
    python alttrain.py --model deepseek-r1-distill-llama-8b --dry-run --gpu-memory-gib 48   # its memory plan
    python alttrain.py --model deepseek-r1-distill-llama-8b                 # the paper's recipe, one GPU
    python alttrain.py --model smollm2-135m --data data/train.jsonl ...     # CPU, see README quick start
    torchrun --nproc_per_node 4 alttrain.py --model ...                     # 4 GPUs: each step split (support/distributed.py)
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

# What is not the method lives in the support/ package (support/__init__.py lists its modules): errors and
# files, the run folder and checkpoints, this machine, the memory plan, model loading, chat templates.
from support import distributed as dist, memory
from support.chat import close_think, encode_prompt, generate_all, render_prompt, template_opens_think
from support.files import HelpFormatter, UserError, atomic_write, cli, count_or_all, sha256_file, write_jsonl
from support.machine import attention_for, device, dtype_name, keep_freed_memory, pad_multiple, round_up
from support.models import (CPU_PARAM_LIMIT, MODEL_ALIASES, load_config, load_model, load_tokenizer, lora_input_casting,
                            resolve_model, tokenizer_source)
from support.data import (check_structure_data, has_trace, load_ha_prompt, load_queries, read_built, read_lines,
                          read_refusals, select_queries, split_response)
from support.plan import check_generation_memory, length_report, plan_training, planned_precision
from support.runs import (CONFIG_NAME, DATA_NAME, LOG_NAME, check_resume_matches, check_train_flags, clear_old_run,
                          load_checkpoint, merge_adapter, prepare_out_dir, save_checkpoint, save_final, truncate_log)
from support.sentences import first_sentence, ha_verdict

HERE = Path(__file__).resolve().parent
PROMPTS = HERE / "prompts"


# =====================================================================================================
# 0. Configuration: every hyperparameter in one place
# =====================================================================================================
# R1-Act's recipe, which the paper follows: QLoRA (4-bit NF4 base, 8-bit AdamW), LoRA r=16 on every linear
# projection, lr 1e-5 with 5 warmup steps then cosine, 15 epochs, batch 8 (16 for R1-Qwen-1.5B: the alias
# table in support/models.py). These are the command line's defaults; `python alttrain.py --help` lists all.
LORA_R, LORA_ALPHA, LORA_DROPOUT = 16, 16, 0.0
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
OPTIM, LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = "adamw8bit", 1e-5, (0.9, 0.95), 1e-4, 1.0
EPOCHS, BATCH_SIZE, WARMUP_STEPS = 15, 8, 5
LOSS_CHUNK, SEED = 1024, 1995
# Every example trains, however long: R1-Act trains with max_seq_length 32768, and the long examples are the
# benign ones whose whole trace is kept (math, code), so a length cap would quietly change the data mix. The
# memory plan packs micro-batches by tokens (a long example alone, short ones together) and refuses, before the
# model loads, an example too long for the GPU even alone. --max-len N drops longer examples, --truncate cuts them.
MAX_LEN = None
HA_WEIGHT = 1.0  # the assessment sentence's tokens weigh like any other (plain SFT); the CPU quick start uses 20
STRUCTURES = ("alt", "no-pu", "no-ha", "no-cr", "direct-refusal", "original")
# What each --data source trains on when --n-harmful/--n-benign/--structure are not given: SafeChain's
# 900 + 100 for AltTrain (the paper); STAR-1's 1K (all harmful-topic queries with policy-grounded
# reasoning) as released, the paper's STAR-1 baseline.
RECIPES = {"safechain": dict(n_harmful=900, n_benign=100, structure="alt"),
           "star1": dict(n_harmful=None, n_benign=None, structure="original")}
LOCAL_RECIPE = RECIPES["safechain"]
UNSET = -1  # a count flag that was not given (argparse leaves non-string defaults alone)


# =====================================================================================================
# 1. Building the structured examples (paper section 4): PU -> HA -> CR
# =====================================================================================================


def pick(options: list[str], key: str) -> str:
    """A template chosen by a stable hash of the query: varied across queries, same on every run."""
    return options[int(hashlib.sha256(key.encode()).hexdigest(), 16) % len(options)]


def clean_ha(text: str) -> str:
    text = re.sub(r"^\s*<think>\s*", "", text).split("</think>")[0]
    text = re.sub(r"^\s*(sentence|assessment|answer)\s*:\s*", "", text.strip(), flags=re.I)
    sentence, _ = first_sentence(text.strip().strip('"'))
    return sentence.strip().strip('"')


def build_example(query: str, label: str, reasoning: str, answer: str, ha: str, structure: str = "alt",
                  source: str = "", refusals: tuple[str, ...] | None = None) -> dict:
    """One training example with every part in its own field. `reasoning`/`answer`: the original trace and
    answer; `ha`: the assessment sentence; `refusals`: the CR wordings (default prompts/cr_refusal.txt).

    AltTrain (structure 'alt'), the paper's section 4:
      PU  the trace's first sentence: the model's own understanding of the problem, kept
      HA  one sentence: is it harmful, and so should I help?
      CR  harmful: stop and refuse (a refusal line, then a refusal answer);
          benign: the rest of the original trace, then its answer (keep solving as before)"""
    if reasoning:
        pu, rest = first_sentence(reasoning)
    else:  # a self-trace from a model that does not reason: PU is its answer's first sentence
        pu, rest = first_sentence(answer)[0], ""
    if label == "harmful" and structure != "original":
        cr = pick(refusals or read_lines(PROMPTS / "cr_refusal.txt"), query)
        answer = pick(read_lines(PROMPTS / "refusal_answer.txt"), query)
    else:
        cr = rest
    pu, ha, cr = ablate(structure, label, pu, ha, cr, rest)
    think = reasoning if structure == "original" else "\n\n".join(x for x in (pu, ha, cr) if x)
    return dict(query=query, label=label, pu=pu, ha=ha, cr=cr, answer=answer,
                response=f"<think>\n{think}\n</think>\n\n{answer}", structure=structure, source=source)


def ablate(structure: str, label: str, pu: str, ha: str, cr: str, rest: str) -> tuple[str, str, str]:
    """The paper's ablations and baselines, as parts of the method dropped or replaced:
      no-pu / no-ha / no-cr   drop that part (the ablation table)
      direct-refusal          harmful: an empty <think> then the refusal; benign: PU and the rest, no HA
      original                the reference response as it is (SafeChain / STAR-1 baselines): no HA"""
    if structure == "alt":
        return pu, ha, cr
    return {"no-pu": ("", ha, cr), "no-ha": (pu, "", cr), "no-cr": (pu, ha, ""),
            "direct-refusal": ("", "", "") if label == "harmful" else (pu, "", rest),
            "original": (pu, "", cr)}[structure]


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
        if not hasattr(ha_model, "generate"):  # a served model (--ha-api-base): the same request as a user
            # message, its own chat template on the server, greedy; checked and counted as a local model's
            outs = ha_model.run_all([functools.partial(ha_model.chat, [{"role": "user", "content": template.format(
                query=queries[i]["query"], label=queries[i]["label"])}], 64) for i in todo], desc="assessments")
        else:
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


# =====================================================================================================
# 2. Tokenisation: the chat template's prompt + our response + EOS, loss on the response only
# =====================================================================================================


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


def tokenize_examples(args, tok, examples: list[dict]) -> tuple[list[dict], dict]:
    """Every built example encoded. Without --max-len all of them; with it, longer ones are dropped, or with
    --truncate cut to --max-len tokens (no EOS then: the example did not end there). Returns (data, counts)."""
    data, counts = [], dict(dropped_too_long=0, truncated=0)
    for ex in tqdm(examples, desc="tokenise", unit="example", disable=len(examples) < 2000 or not dist.is_main()):
        enc = encode_example(tok, ex["query"], ex["response"], args.system_prompt, ex.get("ha") or "", args.ha_weight)
        n = len(enc["input_ids"])
        if args.max_len and n > args.max_len:
            if not args.truncate or enc["labels"][args.max_len - 1] == -100:  # the prompt alone is too long: drop
                counts["dropped_too_long"] += 1
                continue
            enc = {key: v[:args.max_len] for key, v in enc.items()}
            counts["truncated"] += 1
        data.append(enc)
    if counts["dropped_too_long"] or counts["truncated"]:
        print(f"--max-len {args.max_len}: {counts['dropped_too_long']} longer examples left out, "
              f"{counts['truncated']} cut to {args.max_len} tokens")
    if not data:
        raise UserError(f"no example fits in --max-len {args.max_len}")
    return data, counts


def collate(batch: list[dict], pad_id: int, multiple: int = 1) -> dict:
    """Right-pad a batch to its longest example, rounded up to `multiple` (pad_multiple: bf16 on CPU). Padding
    is found from lengths, not from the pad id, so a pad id equal to EOS never masks the real EOS (a model
    trained that way never learns to stop). Padding comes after every real token: causal attention never
    lets a real token see it, and its labels are -100."""
    width = round_up(max(len(ex["input_ids"]) for ex in batch), multiple)
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


def micro_batches(idx: list[int], lengths: list[int], micro: int, budget: int | None, multiple: int = 1,
                  most: int | None = None) -> list[list[int]]:
    """One step's examples, longest first, cut into micro-batches (their gradients add up: the same step).
    With a token `budget` (the memory plan's, by default): as many examples as fit in `budget` padded tokens, at
    most `most` (torchrun: a process's share of the batch, so that every process gets some), so a long trace
    goes alone and short refusals go together. Without one (--micro-batch-size): `micro` each."""
    if budget is None:
        return [idx[j:j + micro] for j in range(0, len(idx), micro)]
    out = []
    for i in idx:
        if out and len(out[-1]) < (most or len(idx)) and (len(out[-1]) + 1) * round_up(lengths[out[-1][0]], multiple) <= budget:
            out[-1].append(i)  # the first example of a micro-batch is its longest: it sets the width
        else:
            out.append([i])
    return out


# =====================================================================================================
# 3. Training
# =====================================================================================================
def lr_at(step: int, total: int, base_lr: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0 (R1-Act: 5 warmup steps, cosine)."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def add_lora(model, args, quant: bool):
    """Wrap the base with LoRA adapters, with gradient checkpointing unless --no-grad-ckpt.

    Checkpointing: each decoder layer keeps only its input and runs its forward again in backward, and only
    in training mode (transformers' GradientCheckpointingLayer checks `self.training`): the loop calls
    model.train(). It is enabled after the adapters exist, non-reentrant. Pitfall: with reentrant
    checkpointing, a block whose inputs need no grad returns no grad, and the frozen embedding's output needs
    none, so LoRA would silently learn nothing; non-reentrant checkpointing is immune. Input grads (the
    embedding output requiring grad) are then a choice, made here: on when adapters reach layer 0 (free
    there); off with --lora-layers, so that backward stops at the lowest adapted layer and the frozen layers
    below it keep nothing for backward (support/memory.py counts `lora_layers` layers). transformers turns
    them on whenever it enables checkpointing (modeling_utils.py, _activation_checkpointing_enable:
    `needs_embedding_grads`), and PEFT too when it wraps a checkpointed unquantised model
    (PeftModel._prepare_model_for_gradient_checkpointing): hence wrap first, then enable, then decide.

    Precision: PEFT's prepare_model_for_kbit_training is not called. All it would add here is a cast of every
    unquantised weight (embeddings, LM head, norms) to fp32 - 2 GiB more for R1-8B, and under bf16 autocast
    the matmuls cast them back to bf16 anyway. The frozen weights stay in the dtype they were loaded in;
    the LoRA weights are fp32 (get_peft_model upcasts bf16 adapters), and so are their gradients and the
    optimiser state."""
    from peft import LoraConfig, get_peft_model
    for param in model.parameters():  # the base is frozen; only the adapters train
        param.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    top = None if args.lora_layers is None else list(range(max(0, n_layers - args.lora_layers), n_layers))
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_targets.split(","), layers_to_transform=top,
                      bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if not args.no_grad_ckpt:
        base = model.get_base_model()
        # activation_checkpointing_enable: transformers' name since gradient_checkpointing_enable was deprecated
        # (a FutureWarning in 5.25); the older name where it is all there is. Its first argument: checkpoint's kwargs.
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        base.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
        input_grads(base, on=args.lora_layers is None)
    return model


def input_grads(model, on: bool):
    """Make the embedding output require grad (on) or not (off), whatever transformers enabled before."""
    if getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    if on:
        model.enable_input_require_grads()


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
    plan's; default --micro-batch-size, else the batch); `dtype` the compute dtype. Returns summary metrics.
    Under torchrun: not DDP, whose hooks need equal backward passes on every process (a step's share is often
    uneven), but one all_reduce of the LoRA gradients a step (support/distributed.py says why)."""
    micro = micro or args.micro_batch_size or args.batch_size
    lengths = [len(ex["input_ids"]) for ex in data]
    dev = torch.device(model.device if hasattr(model, "device") else device())
    pad = pad_multiple(dev.type, dtype)  # bf16 on CPU: lengths rounded up to 16 (fewer matmul shapes to build)
    # the plan's micro-batch is counted at the longest width; as tokens it holds more of the shorter examples
    budget = None if args.micro_batch_size else micro * round_up(max(lengths), pad)
    share = math.ceil(args.batch_size / dist.world())  # torchrun: no micro-batch holds more than a process's share
    # Each step's examples are a function of (seed, epoch) alone, formed at --batch-size whatever the micro-batch:
    # that makes --resume exact, and a micro-batch only splits a step (the same training). Computed once an epoch.
    batcher = length_grouped_batches if args.batching == "length" else random_batches
    epoch_steps = functools.lru_cache(maxsize=1)(lambda epoch: batcher(lengths, args.batch_size, args.seed + epoch))
    steps_per_epoch = len(epoch_steps(0))
    total = steps_per_epoch * args.epochs
    optimizer = make_optimizer(model, args)
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the trainable ones
    step = load_checkpoint(out, model, optimizer) if args.resume else 0
    if step and dist.is_main():
        print(f"resuming at step {step}/{total}")
        truncate_log(out, step)  # the steps after the checkpoint are trained again, and logged again
    # bf16: the forward runs under autocast (matmuls in bf16), backward follows it; the LoRA weights and their
    # gradients stay fp32, and chunk_loss computes the loss in fp32. fp32: autocast is off, nothing changes.
    autocast = functools.partial(torch.autocast, dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    # PEFT casts each LoRA layer's input to the LoRA weights' dtype (fp32), and autocast casts it straight back
    # to bf16 for the matmul: the same numbers, after two copies of every activation. Under autocast the
    # first cast is left out (10% faster bf16 steps on CPU). Not with LoRA dropout, which would then scale
    # bf16 inputs by a bf16-rounded 1/(1-p): other numbers.
    lora_input_casting(model, on=dtype != torch.bfloat16 or args.lora_dropout > 0)
    # the attention kernel for the loop (attention_for: eager on CPU for short examples, else SDPA); the same math
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(attention_for(args.attention, dev.type, max(lengths)))
    computed = real = supervised = 0
    model.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not dist.is_main())
    t0, last = time.time(), {}
    while step < total:
        epoch, k = divmod(step, steps_per_epoch)
        idx = sorted(epoch_steps(epoch)[k], key=lambda i: -lengths[i])  # similar lengths share a micro-batch
        batches = [collate([data[i] for i in mb], tok.pad_token_id, pad)
                   for mb in micro_batches(idx, lengths, micro, budget, pad, share)]
        n_sup = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        norm = loss_normaliser(batches)  # the whole step's: every process computes it alike (torchrun)
        computed += sum(b["input_ids"].numel() for b in batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        lr = lr_at(step, total, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step, loss_sum = time.time(), 0.0
        for b in batches[dist.rank()::dist.world()]:  # torchrun: process r trains micro-batches r, r+N, ... of the step
            b = {key: v.to(dev) for key, v in b.items()}
            with autocast():
                loss = response_loss_sum(model, b, args.loss_chunk) / norm
            loss.backward()
            loss_sum += loss.item()
        loss_sum = dist.sum_grads(params, loss_sum)  # torchrun: sum the processes' gradients; all clip and step alike
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
        if dist.is_main():
            with open(out / LOG_NAME, "a") as f:
                f.write(json.dumps(last) + "\n")
        bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)
        if (step % args.save_every == 0 or step == total) and dist.is_main():
            save_checkpoint(out, model, optimizer, step)
        if args.halt_after and step >= args.halt_after and step < total:
            bar.close()
            lora_input_casting(model, on=True)
            print(f"--halt-after {args.halt_after}: stopping as if killed (continue with --resume)")
            return dict(halted=True, step=step)
    bar.close()
    lora_input_casting(model, on=True)  # PEFT's default again: the model may run outside autocast next
    wall = time.time() - t0
    return dict(halted=False, steps=total, final_loss=last.get("loss"), wall_s=round(wall, 2),
                tokens_per_s=round(real / wall, 1) if wall else None,
                supervised_fraction_of_computed=round(supervised / computed, 4) if computed else None,
                real_fraction_of_computed=round(real / computed, 4) if computed else None)


# =====================================================================================================
# 4. Putting it together
# =====================================================================================================


def apply_recipe(args):
    """Fill the flags that were not given from the --data source's recipe (RECIPES). Idempotent."""
    recipe = RECIPES.get(args.data, LOCAL_RECIPE)
    for flag in ("n_harmful", "n_benign"):
        if getattr(args, flag) == UNSET:
            setattr(args, flag, recipe[flag])
    args.structure = args.structure or recipe["structure"]
    return args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alttrain.py", description=__doc__.split("\n\n")[0].strip(),
        formatter_class=HelpFormatter)
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
                        "computes it natively (CUDA GPUs since Ampere; CPUs with AMX, or AVX512-BF16 where a matmul probe "
                        "finds it faster), else fp32")

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
                        "'template' uses prompts/ha_*.txt only; with --ha-api-base, a served model's name "
                        "(e.g. gpt-4o, as the paper), asked through chat completions")
    g.add_argument("--ha-api-base", default=None,
                   help="an OpenAI-compatible server for --ha-model, e.g. https://api.openai.com/v1 or "
                        "http://127.0.0.1:8000/v1 (key: OPENAI_API_KEY, never written; support/api.py)")
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
    g.add_argument("--lora-r", type=int, default=LORA_R, help="LoRA rank")
    g.add_argument("--lora-alpha", type=int, default=LORA_ALPHA, help="LoRA scale numerator (update x alpha/r)")
    g.add_argument("--lora-dropout", type=float, default=LORA_DROPOUT, help="dropout on the LoRA input")
    g.add_argument("--lora-targets", default=LORA_TARGETS,
                   help="comma-separated module names that get adapters (all linear projections)")
    g.add_argument("--lora-layers", type=int, default=None,
                   help="adapters on the top N layers only (default: all). Backward then stops at layer "
                        "L-N: a CPU speed trick for the quick start, not the paper's recipe")

    g = p.add_argument_group("optimiser and schedule")
    g.add_argument("--optim", choices=("adamw8bit", "adamw"), default=OPTIM,
                   help="bitsandbytes 8-bit AdamW (R1-Act) or torch AdamW")
    g.add_argument("--lr", type=float, default=LR, help="peak learning rate")
    g.add_argument("--betas", type=float, nargs=2, default=BETAS, help="Adam beta1 beta2")
    g.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="decoupled weight decay")
    g.add_argument("--warmup-steps", type=int, default=WARMUP_STEPS, help="linear warmup steps, then cosine to 0")
    g.add_argument("--grad-clip", type=float, default=GRAD_CLIP, help="max gradient norm (0: off)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=EPOCHS, help="passes over the examples")
    g.add_argument("--batch-size", type=int, default=None,
                   help="examples per optimiser step (default: the alias's, else 8)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="examples per forward pass: each step's batch is split into micro-batches whose gradients "
                        "add up (the same examples in the same steps, the same update). Default: the largest "
                        "that fits the memory plan")
    g.add_argument("--loss-chunk", type=int, default=LOSS_CHUNK,
                   help="supervised positions per chunk of the LM head + cross-entropy, recomputed in backward, so "
                        "a batch's vocabulary-wide logits never exist at once (0: no chunking)")
    g.add_argument("--batching", choices=("length", "random"), default="length",
                   help="length = batches of similar lengths (little padding); random = any examples together, "
                        "as Trainer/TRL do (3-4x the compute on AltTrain-1K's lengths, see bench/). The loss "
                        "is normalised per step, so this also sets how examples weigh: docs/method.md, Training details")
    g.add_argument("--max-len", type=int, default=MAX_LEN,
                   help="leave out examples longer than this many tokens, counted (default: none, every example "
                        "trains; the plan refuses one too long for the GPU even alone and names the value to pass)")
    g.add_argument("--truncate", action="store_true",
                   help="with --max-len: cut longer examples to --max-len tokens instead of leaving them out")
    g.add_argument("--no-grad-ckpt", action="store_true", help="turn gradient checkpointing off")
    g.add_argument("--attention", choices=("auto", "sdpa", "eager"), default="auto",
                   help="attention kernel for training: auto = eager on CPU for examples up to 1024 tokens (faster "
                        "there; its seq^2 memory is counted by the plan), else sdpa")
    g.add_argument("--ha-weight", type=float, default=HA_WEIGHT,
                   help="loss weight of the assessment (HA) sentence's tokens, others 1 (paper: 1, plain SFT). "
                        "The verdict is a few tokens against hundreds of trace tokens; a small model may need "
                        "them to weigh more to learn the judgement rather than only the traces")
    g.add_argument("--seed", type=int, default=SEED, help="seed for selection, data order and LoRA init")

    g = p.add_argument_group("output")
    g.add_argument("--out", default="out", help="output folder")
    g.add_argument("--save-every", type=int, default=50, help="checkpoint every N optimiser steps")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    g.add_argument("--merge", action="store_true", help="also write merged full weights to <out>/merged")
    g.add_argument("--halt-after", type=int, default=None,
                   help="stop as if killed after N optimiser steps (to test --resume)")
    g.add_argument("--skip-memory-check", action="store_true",
                   help="run even where the memory estimate (support/memory.py) says it will not fit")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (each term, the micro-batch, the effective batch) and exit; for the "
                        "aliases nothing is downloaded")
    g.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="plan for a CUDA GPU with this much free memory (GiB) instead of reading the device: with "
                        "--dry-run, a plan for a GPU you do not have")
    return p


def plan_from_data(args, model_config, quant: bool, dtype_bytes: int, cuda: bool):
    """--dry-run with a local --data file (or --built): the examples built as the run builds them, with no model
    loaded (assessments from the data or prompts/ha_*.txt: one sentence either way), tokenised with the backbone's
    own tokenizer (R1-Distill-Qwen-7B's offline from its GGUF package: support/models.py tokenizer_source), and
    the plan again from their real lengths. Queries without a reference trace are left out: their trace does not
    exist until the model writes it (the run plans again then)."""
    if not (args.built or Path(args.data).is_file()):
        print(f"(--data {args.data} is not a local file: pass one, or --built, to plan from the real lengths)")
        return
    tok = load_tokenizer(tokenizer_source(args.model, args.cache_dir), args.trust_remote_code)
    if args.built:
        examples = read_built(args.built)
    else:
        queries = select_queries(load_queries(args), args.n_harmful, args.n_benign, args.seed)
        traced = [q for q in queries if has_trace(q)]
        if len(traced) < len(queries):
            print(f"{len(queries) - len(traced)} queries have no trace (the model writes one): not planned here")
        examples, _ = build_examples(args, traced) if traced else ([], {})
    if not examples:
        return
    data, _ = tokenize_examples(args, tok, examples)
    print(length_report([len(ex["input_ids"]) for ex in data]))
    plan_training(args, model_config, quant, dtype_bytes, cuda, data)


def parse_args(argv=None):
    """The command line as run() sees it (for tests and scripts that build examples without training)."""
    return apply_recipe(build_parser().parse_args(argv))


def main(argv=None) -> int:
    return dist.finish(cli("alttrain.py", build_parser(), run, argv))  # torchrun: all processes end together


def run(args):
    dist.init()  # under torchrun: join the other processes (support/distributed.py); alone: nothing changes
    apply_recipe(args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    alias = MODEL_ALIASES.get(args.model.lower(), {})
    args.batch_size = args.batch_size or alias.get("batch", BATCH_SIZE)
    if args.system_prompt is None:  # R1-Act's system prompt for the backbone; '' (given) means none
        args.system_prompt = alias.get("system")
    check_train_flags(args)  # each bad value named by its flag, before anything is loaded
    quant = not args.no_quant

    # -- precision and the memory plan, before anything is loaded or downloaded (the aliases carry their dims)
    cuda, dtype, why = planned_precision(args)  # --gpu-memory-gib plans for a GPU that is not here
    dtype_bytes = torch.finfo(dtype).bits // 8
    print(f"precision: {why}")
    model_config = SimpleNamespace(**alias["dims"]) if "dims" in alias else \
        load_config(resolve_model(args.model, args.cache_dir), args.trust_remote_code)
    micro = plan_training(args, model_config, quant, dtype_bytes, cuda)
    if args.dry_run:  # with a local --data, the plan again from the examples' real token lengths
        plan_from_data(args, model_config, quant, dtype_bytes, cuda)
        print("--dry-run: no model loaded, nothing written")
        return
    out = prepare_out_dir(args) if dist.is_main() else Path(args.out)  # under torchrun rank 0 alone writes files
    path = dist.main_first(resolve_model, args.model, args.cache_dir)  # an alias is converted once, by rank 0
    tok = load_tokenizer(path, args.trust_remote_code, args.cache_dir)
    model = data = too_long = config = None
    # -- the examples: the run's own copy on resume, a prebuilt set, or built now (under torchrun: by rank 0 alone)
    if dist.is_main():
        data_file = out / DATA_NAME
        if args.resume and data_file.exists():
            examples = [json.loads(l) for l in open(data_file, encoding="utf-8")]
            stats = json.loads((out / CONFIG_NAME).read_text()).get("build_stats", {})
        elif args.built:
            examples, stats = read_built(args.built), {"prebuilt": args.built}
        else:
            queries = select_queries(load_queries(args), args.n_harmful, args.n_benign, args.seed)
            check_structure_data(args, queries)  # before any model is loaded
            gen_model = ha_model = ha_tok = None
            if args.ha_api_base and args.ha_model in (None, "template"):
                raise UserError("--ha-api-base needs --ha-model NAME: the served model (e.g. gpt-4o)")
            need_ha = (uses_ha(args.structure) and args.ha_model != "template"
                       and any(not q.get("ha") for q in queries))  # the data may carry them all
            if any(not has_trace(q) for q in queries) or (need_ha and args.ha_model is None):
                longest = max(len(encode_prompt(tok, render_prompt(tok, q["query"], args.system_prompt))) for q in queries)
                check_generation_memory(args, load_config(path, args.trust_remote_code), quant, dtype_bytes, cuda, longest)
                model = load_model(path, quant, args.trust_remote_code, args.allow_cpu, dtype)
                gen_model = model
            if need_ha and args.ha_model is None and not args.ha_api_base:
                ha_model, ha_tok = model, tok
            elif need_ha and args.ha_api_base:  # a served model (support/api.py): checked now, nothing loaded here
                from support import api
                ha_model = api.connect(args.ha_api_base, args.ha_model, "--ha-api-base/--ha-model")
            elif need_ha:
                ha_path = resolve_model(args.ha_model, args.cache_dir)
                ha_tok = load_tokenizer(ha_path, args.trust_remote_code, args.cache_dir)
                ha_model = load_model(ha_path, quant, args.trust_remote_code, args.allow_cpu, dtype)
            examples, stats = build_examples(args, queries, gen_model, tok, ha_model, ha_tok)
            if ha_model is not None and ha_model is not model:
                del ha_model  # its memory is counted free again by the plan below (memory.available collects it)
        if args.overwrite:  # only now that the new examples exist: a run that fails to start keeps the old one
            clear_old_run(out)
        out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails to start leaves no empty --out behind
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

        # -- tokenise: every example, unless --max-len says otherwise
        data, too_long = tokenize_examples(args, tok, examples)
        print(length_report([len(ex["input_ids"]) for ex in data]))
    elif args.build_only:
        return
    data, too_long, config = dist.broadcast((data, too_long, config))  # rank 0's tokens reach every process

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
    if metrics.get("halted") or not dist.is_main():  # under torchrun, rank 0 alone writes the outputs
        return

    # -- outputs: adapter + tokenizer (written beside, then moved in), config marked finished
    save_final(out, model, tok)
    if args.merge:
        merge_adapter(path, out, tok, args.trust_remote_code, dtype)
    config.update(finished=True, **too_long, n_train_examples=len(data), micro_batch=micro, metrics=metrics)
    atomic_write(out / CONFIG_NAME, json.dumps(config, indent=2))
    print("done: " + ", ".join(f"{k}={v}" for k, v in metrics.items() if k != "halted") + f" -> {out}")


if __name__ == "__main__":
    sys.exit(main())
