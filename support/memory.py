"""
How much memory a run will need, from the model's config alone, so that alttrain.py and eval.py can refuse
a run that cannot fit *before* loading anything - in seconds, with a suggestion - instead of failing with an
out-of-memory error an hour in (after the download).

The estimate is a sum of parts, each printed, in bytes:
  weights      4-bit NF4 with double quantisation: ~4.13 bits per linear weight; embeddings, LM head and
               norms stay unquantised, at the compute dtype (bf16, or fp32 where the run computes in fp32:
               alttrain.py does not upcast them, see add_lora). All at the compute dtype without --no-quant.
  lora         adapter weights and their gradients (fp32), and the optimiser's state: 8-bit AdamW keeps two
               1-byte moments per parameter, torch AdamW two fp32 ones.
  activations  what backward needs, for the layers gradients flow through (all of them, or the top
               --lora-layers): with checkpointing, one hidden state per layer (each checkpointed layer's input)
               plus one layer's worth, recomputed in backward (layer_bytes_per_token); without it, every
               layer's worth. One layer holds, per token (q = heads x head dim, I = intermediate):
                 2h   the two RMSNorms' outputs (the LoRA A inputs of q/k/v and of gate/up)
                 4q   q after RoPE, k and v at full head count (transformers' repeat_kv: with a padding mask it
                      does not pass enable_gqa to SDPA, so K and V are materialised for every head), and the
                      attention output (SDPA's fused kernels write it in the layout o_proj reads, so transformers'
                      transpose(1, 2).contiguous() is the same memory, not a copy)
                 4I   the MLP's gate, up, act and product
                 7r   the LoRA A outputs (the B inputs) of the seven projections
                 2d   RoPE's cos and sin (d = head dim), and in fp32 SDPA's logsumexp per head and the norms' rsqrt
               all in the compute dtype, plus the RMSNorms' fp32 tensors: in fp32, the second norm's input (the
               residual; the first's is the layer input, counted above); under bf16 autocast, both norms' fp32
               copies of their inputs, 2 x 4h bytes. And once per micro-batch, the padding mask SDPA keeps:
               micro-batch x width^2 in the compute dtype, and under autocast the bf16 copies of one layer's
               LoRA weights (tokens-independent, MBs). Measured tensor by tensor on a real-width
               R1-Distill-Qwen-7B slice (scripts/backbone_slice.py, results/backbone_slice.md); the formula
               before 2026-12 (7h + 2kv + 4I values) missed the repeated K/V and the fp32 norm copies, 16% under
               for R1-8B in bf16. The final norm's fp32 copy is freed before the first layer is recomputed; at
               the loss it is less than the recomputed layer this term already counts. SDPA keeps no other
               seq^2 term; eager attention (alttrain.py's default on CPU) keeps each layer's attention
               probabilities, heads x seq^2 per sequence (fp32 softmax output, and a bf16 copy under bf16).
  logits       only at supervised positions (alttrain.py's loss), vocabulary-wide, for at most --loss-chunk
               positions at a time (the loss is computed chunk by chunk and recomputed in backward): at a chunk's
               peak, 12 bytes a position and vocabulary entry, log-softmax's fp32 output and, in backward, its
               gradient and the logits' fp32 gradient (the logits and their fp32 copy are freed in the forward:
               nothing saves them). Measured by the tensors alive, in fp32 and under bf16 autocast
               (results/backbone_slice.md). Unchunked, 8 x 3K supervised tokens of R1-8B would need ~34 GiB
               here; in chunks of 1024, 1.5 GiB.
  kv_cache     generation: 2 (k, v) x layers x kv heads x head dim x batch x (prompt + new tokens).
  overhead     CUDA context and allocator slack (GPU only).

It is an estimate, checked in tests against measured peaks on CPU (within a factor of 1.5 either way). The
real peak depends on kernels, fragmentation and the allocator; --skip-memory-check runs anyway.
"""
from __future__ import annotations

GiB = 1024 ** 3
CUDA_OVERHEAD = int(0.8 * GiB)   # context + cuBLAS workspaces, roughly
NF4_BYTES = 4.127 / 8            # 4-bit codes + 8-bit absmax per 64 + fp32 per 256 blocks (double quant)


def dims(config) -> dict:
    h, L = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    inter = getattr(config, "intermediate_size", None) or 4 * h
    return dict(h=h, L=L, heads=heads, q=heads * head_dim, kv=kv_heads * head_dim, inter=inter, vocab=config.vocab_size,
                tied=bool(getattr(config, "tie_word_embeddings", False)))


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear projection of one decoder layer (Llama/Qwen naming)."""
    d = dims(config)
    return dict(q_proj=(d["h"], d["q"]), k_proj=(d["h"], d["kv"]), v_proj=(d["h"], d["kv"]),
                o_proj=(d["q"], d["h"]), gate_proj=(d["h"], d["inter"]), up_proj=(d["h"], d["inter"]),
                down_proj=(d["inter"], d["h"]))


def weight_bytes(config, quant: bool, dtype_bytes: int) -> int:
    d, shapes = dims(config), linear_shapes(config)
    linear = d["L"] * sum(i * o for i, o in shapes.values())
    other = d["vocab"] * d["h"] * (1 if d["tied"] else 2) + d["L"] * 2 * d["h"] + d["h"]  # embed, head, norms
    if quant:  # the unquantised parameters stay at the dtype they were loaded in
        return int(linear * NF4_BYTES + other * dtype_bytes)
    return (linear + other) * dtype_bytes


def lora_params(config, r: int, targets: list[str], layers: int | None) -> int:
    shapes, n = linear_shapes(config), dims(config)["L"]
    per_layer = sum(r * (i + o) for name, (i, o) in shapes.items() if name in targets)
    return per_layer * (n if layers is None else min(layers, n))


def layer_bytes_per_token(config, dtype_bytes: int, lora_r: int = 16, lora_modules: int = 7) -> int:
    """What autograd keeps for one decoder layer, per token, in bytes (the module docstring lists the tensors):
    what the layer being recomputed holds under checkpointing. Checked tensor by tensor (saved_tensors_hooks) on
    a real-width slice and in tests/test_memory.py."""
    d = dims(config)
    values = 2 * d["h"] + 4 * d["q"] + 4 * d["inter"] + lora_modules * lora_r + 2 * d["q"] // d["heads"]  # + RoPE cos, sin
    norms = 4 * d["h"] * (1 if dtype_bytes == 4 else 2)  # fp32: norm 2's input (the residual); bf16: two fp32 copies
    small = 4 * d["heads"] + 2 * 4                       # SDPA's logsumexp per head, the norms' rsqrt (fp32)
    return values * dtype_bytes + norms + small


def training(config, *, quant: bool, dtype_bytes: int, lora_r: int, lora_targets: list[str],
             lora_layers: int | None, optim: str, micro_batch: int, width: int, supervised: int,
             grad_ckpt: bool, cuda: bool, loss_chunk: int = 0, attention: str = "sdpa") -> dict:
    """Bytes for one training run. `dtype_bytes`: the compute dtype (2 for bf16, 4 for fp32). `width` = the
    widest micro-batch's padded length, `supervised` = the most supervised tokens in one micro-batch (both
    known after tokenisation). `loss_chunk`: positions per chunk of the loss (0: all at once). `attention`:
    sdpa or eager (eager also holds the seq x seq attention probabilities of every layer backward needs)."""
    d = dims(config)
    n_lora = lora_params(config, lora_r, lora_targets, lora_layers)
    optim_bytes = 2 if optim == "adamw8bit" else 8
    tokens = micro_batch * width
    deep = d["L"] if lora_layers is None else min(lora_layers, d["L"])  # layers that gradients flow through
    per_layer = layer_bytes_per_token(config, dtype_bytes, lora_r, len([t for t in lora_targets if t in linear_shapes(config)]))
    once = micro_batch * width * width * dtype_bytes  # the padding mask SDPA is given (one for all layers)
    casts = lora_params(config, lora_r, lora_targets, 1) * dtype_bytes if dtype_bytes != 4 else 0  # autocast's
    if grad_ckpt:  # each layer's input, and one layer recomputed at a time      # copies of one layer's LoRA weights
        acts = tokens * (deep * d["h"] * dtype_bytes + per_layer) + once + casts
    else:          # every layer's tensors; in fp32 the first norm also keeps the layer's input
        acts = tokens * deep * (per_layer + (d["h"] * 4 if dtype_bytes == 4 else 0)) + once + casts * deep
    if attention == "eager":  # softmax output (fp32) and, under bf16, its bf16 copy the next matmul keeps
        probs = micro_batch * d["heads"] * width * width * (4 + (dtype_bytes if dtype_bytes != 4 else 0))
        acts += probs * (1 if grad_ckpt else deep)
    # per supervised position and vocabulary entry, at a chunk's peak (in backward): log-softmax's fp32 output (the one
    # tensor cross-entropy saves), its gradient and the logits' fp32 gradient. The logits and their fp32 copy are
    # saved by nothing and freed in the forward. Measured: 12.0 bytes in fp32 and under bf16 autocast (before: 16, 18)
    logit_bytes = 4 + 4 + 4
    parts = dict(weights=weight_bytes(config, quant, dtype_bytes), lora=n_lora * (4 + 4 + optim_bytes),
                 activations=acts, logits=min(supervised, loss_chunk or supervised) * d["vocab"] * logit_bytes,
                 overhead=CUDA_OVERHEAD if cuda else 0)
    return dict(parts=parts, total=sum(parts.values()))


def generation(config, *, quant: bool, dtype_bytes: int, batch: int, prompt_len: int, max_new: int,
               cuda: bool) -> dict:
    """Bytes for batched generation: weights, the KV cache at full length, one layer's activations over the
    prompt (prefill), and the last position's logits."""
    d = dims(config)
    length = prompt_len + max_new
    parts = dict(weights=weight_bytes(config, quant, dtype_bytes),
                 kv_cache=2 * d["L"] * d["kv"] * dtype_bytes * batch * length,
                 activations=batch * prompt_len * dtype_bytes * (7 * d["h"] + 2 * d["kv"] + 4 * d["inter"]),
                 logits=batch * d["vocab"] * 4 * 2,
                 overhead=CUDA_OVERHEAD if cuda else 0)
    return dict(parts=parts, total=sum(parts.values()))


def available(cuda: bool) -> int | None:
    """Free bytes on the GPU (or available RAM on CPU); None if unknown. Collected garbage and PyTorch's
    cached blocks are freed first: memory PyTorch holds for reuse is not used memory."""
    import gc
    gc.collect()
    if cuda:
        import torch
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None


def describe(est: dict) -> str:
    parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in est["parts"].items() if v)
    return f"{est['total'] / GiB:.2f} GiB ({parts})"
