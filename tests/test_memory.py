"""Tests for support/memory.py's estimates and the checks in alttrain.py / eval.py (CPU, nothing downloaded)."""
import json
import os
import subprocess
import sys

import pytest

import alttrain as at
import eval as ev
import support.plan
from support import memory, models

R1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
TARGETS = at.build_parser().parse_args([]).lora_targets.split(",")


def llama(**kw):
    from transformers import LlamaConfig
    return LlamaConfig(**{**dict(vocab_size=500, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2), **kw})


@pytest.mark.parametrize("layers", [None, 2])
def test_counts_match_the_real_model(layers):
    """Weights and LoRA parameters counted from the config equal what PEFT and torch report."""
    import torch
    from transformers import LlamaForCausalLM
    cfg = llama()
    model = LlamaForCausalLM(cfg)
    assert memory.weight_bytes(cfg, quant=False, dtype_bytes=4) == 4 * sum(p.numel() for p in model.parameters())
    args = at.build_parser().parse_args(["--no-grad-ckpt"] + (["--lora-layers", str(layers)] if layers else []))
    peft_model = at.add_lora(model, args, quant=False)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert memory.lora_params(cfg, 16, TARGETS, layers) == trainable
    del torch


PROBE = r"""
import gc, json, sys, torch
import alttrain as at
from support import memory
from transformers import LlamaConfig, LlamaForCausalLM
ckpt, attention = sys.argv[1] == "1", sys.argv[2]
cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
args = at.build_parser().parse_args([] if ckpt else ["--no-grad-ckpt"])
model = at.add_lora(LlamaForCausalLM(cfg), args, quant=False)
model.get_base_model().set_attn_implementation(attention)
ids = torch.randint(0, 2000, (8, 1024)); labels = ids.clone(); labels[:, :512] = -100
rss = lambda f: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(f))
gc.collect(); open("/proc/self/clear_refs", "w").write("5"); base = rss("VmRSS:")   # reset the peak
(at.response_loss_sum(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)) / 1e3).backward()
est = memory.training(cfg, quant=False, dtype_bytes=4, lora_r=16, lora_targets=args.lora_targets.split(","),
                      lora_layers=None, optim="adamw", micro_batch=8, width=1024,
                      supervised=int((labels[:, 1:] != -100).sum()), grad_ckpt=ckpt, cuda=False,
                      attention=attention)
print(json.dumps(dict(peak=rss("VmHWM:") - base, est=est["parts"]["activations"] + est["parts"]["logits"])))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to read peak memory")
@pytest.mark.parametrize("ckpt,attention", [("1", "sdpa"), ("0", "sdpa"), ("0", "eager"), ("1", "eager")])
def test_activation_estimate_against_measured_peak(ckpt, attention):
    """One forward+backward of alttrain's loss (8 x 1024 tokens, half supervised) on a small wide model:
    the estimate of activations + logits is within a factor of 1.5 of the measured peak (RSS growth), with
    SDPA and with eager attention (which keeps 4 heads x 1024^2 probabilities per sequence and layer).
    A fixed malloc mmap threshold makes freed tensors leave RSS, so the peak is the step's own."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(at.HERE)}
    out = subprocess.run([sys.executable, "-c", PROBE, ckpt, attention], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] > 100 * 2 ** 20, r            # the step itself is what is measured
    assert 1 / 1.5 <= r["est"] / r["peak"] <= 1.5, r


def test_paper_backbone_at_batch_8():
    """R1-8B, QLoRA r=16 on all projections, bf16, batch 8: the numbers README prints."""
    from transformers import LlamaConfig
    cfg = LlamaConfig(**R1_8B)
    w = memory.weight_bytes(cfg, quant=True, dtype_bytes=2) / memory.GiB
    assert 5.0 < w < 5.6                      # 3.4 GiB of NF4 linears + 2.0 GiB of bf16 embeddings and head
    assert memory.lora_params(cfg, 16, TARGETS, None) == 41_943_040
    est = lambda micro, width, sup, chunk: memory.training(
        cfg, quant=True, dtype_bytes=2, lora_r=16, lora_targets=TARGETS, lora_layers=None, optim="adamw8bit",
        micro_batch=micro, width=width, supervised=sup, grad_ckpt=True, cuda=True, loss_chunk=chunk)
    short, long_whole, long = est(8, 300, 8 * 60, 1024), est(8, 3072, 8 * 3000, 0), est(8, 3072, 8 * 3000, 1024)
    assert short["total"] < 12 * memory.GiB          # 900 short refusals: fits a 24 GB card
    assert long_whole["total"] > 48 * memory.GiB     # 8 long traces with all their logits at once: not even 48 GB
    assert long_whole["parts"]["logits"] > long_whole["parts"]["activations"]  # ... because of the logits
    assert long["total"] < 40 * memory.GiB           # in chunks of 1024 positions: fits 48 GB at batch 8
    assert long["parts"]["logits"] < 3 * memory.GiB
    assert est(8, 4096, 8 * 4096, 1024)["total"] < 44 * memory.GiB  # the --max-len worst case too
    gen = memory.generation(cfg, quant=True, dtype_bytes=2, batch=8, prompt_len=200, max_new=1024, cuda=True)
    assert gen["parts"]["kv_cache"] == 2 * 32 * 1024 * 2 * 8 * 1224


def test_dry_run_plans_the_papers_command_offline(tmp_path, capsys, monkeypatch):
    """--dry-run with an alias downloads nothing (its dims are in the alias table), writes nothing, and
    fits R1-8B's batch of 8 on a 48 GiB GPU without micro-batching; R1-Qwen-32B gets two micro-batches of 4."""
    def offline(*a, **k):
        raise AssertionError("nothing may be downloaded or loaded")
    for name in ("load_config", "resolve_model", "load_tokenizer", "load_model", "load_queries"):
        monkeypatch.setattr(at, name, offline)
    out = tmp_path / "never"
    assert at.main(["--model", "deepseek-r1-distill-llama-8b", "--dry-run", "--gpu-memory-gib", "48", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "micro-batch 8 of batch 8" in text and "effective batch 8" in text and "bf16" in text
    for term in ("weights", "lora", "activations", "logits", "overhead"):
        assert term in text
    assert not out.exists()
    assert at.main(["--model", "deepseek-r1-distill-qwen-32b", "--dry-run", "--gpu-memory-gib", "48"]) == 0
    assert "micro-batch 4 of batch 8" in capsys.readouterr().out
    # a GPU too small for the model itself (weights, adapters): refused, still offline, naming no length flag
    assert at.main(["--model", "deepseek-r1-distill-qwen-32b", "--dry-run", "--gpu-memory-gib", "16"]) == 2
    err = capsys.readouterr().err
    assert "the model alone does not fit" in err and "--max-len" not in err
    # with --max-len given, a GPU too small for one example that long: refused, naming a smaller --max-len
    assert at.main(["--model", "deepseek-r1-distill-qwen-32b", "--dry-run", "--gpu-memory-gib", "22",
                    "--max-len", "32768"]) == 2
    assert "smaller --max-len" in capsys.readouterr().err


def test_alias_dims_match_the_parameter_counts():
    """The alias table's dims give the published sizes (8.0B for R1-Llama-8B, 32.8B for R1-Qwen-32B, ...),
    so a typo in them would show here rather than in a wrong memory plan."""
    from types import SimpleNamespace
    sizes = {"deepseek-r1-distill-qwen-1.5b": 1.8, "deepseek-r1-distill-qwen-7b": 7.6, "deepseek-r1-distill-llama-8b": 8.0,
             "deepseek-r1-distill-qwen-14b": 14.8, "deepseek-r1-distill-qwen-32b": 32.8}
    for alias, billions in sizes.items():
        n = models.estimate_params(SimpleNamespace(**at.MODEL_ALIASES[alias]["dims"]))
        assert abs(n / 1e9 - billions) / billions < 0.06, (alias, n)


def fake_estimate(per_example):
    """A training estimate of `per_example` bytes per example of a micro-batch, whatever the lengths."""
    def est(args, config, quant, dtype_bytes, cuda, width, supervised, micro):
        return dict(parts=dict(activations=micro * per_example), total=micro * per_example)
    return est


def test_training_refuses_what_cannot_fit(tiny_dir, data_file, tmp_path, capsys, monkeypatch):
    """Too little memory for even one example: a clear refusal before the tokenizer or model is loaded."""
    loaded = []
    monkeypatch.setattr(at, "load_model", lambda *a, **k: loaded.append("model"))
    monkeypatch.setattr(at, "load_tokenizer", lambda *a, **k: loaded.append("tokenizer"))
    monkeypatch.setattr(memory, "available", lambda cuda: 1)   # one byte free
    args = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--batch-size", "4",
            "--out", str(tmp_path / "r")]
    assert at.main(args) == 2
    err = capsys.readouterr().err
    assert "training (micro-batch 1) needs" in err and "--skip-memory-check" in err and not loaded
    assert not (tmp_path / "r").exists()


def test_short_memory_picks_a_micro_batch_and_a_refused_run_resumes(tiny_dir, data_file, tmp_path, capsys,
                                                                    monkeypatch):
    """Room for 2 examples at a time: left alone, the plan picks micro-batches of 2 (the same training);
    an explicit --micro-batch-size 4 is refused after tokenisation, naming the fix, and that run then
    continues with --resume --micro-batch-size 2 without building its examples again."""
    monkeypatch.setattr(support.plan, "training_estimate", fake_estimate(10))
    monkeypatch.setattr(memory, "available", lambda cuda: 25)
    args = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--batch-size", "4",
            "--epochs", "1", "--optim", "adamw"]
    assert at.main(args + ["--out", str(tmp_path / "auto")]) == 0
    assert "micro-batch 2 of batch 4 (auto" in capsys.readouterr().out
    assert json.loads((tmp_path / "auto" / at.CONFIG_NAME).read_text())["micro_batch"] == 2
    assert at.main(args + ["--micro-batch-size", "4", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--resume --micro-batch-size 2" in err
    assert (tmp_path / "r" / at.DATA_NAME).exists() and not (tmp_path / "r" / "checkpoint").exists()
    built = []
    monkeypatch.setattr(at, "build_examples", lambda *a, **k: built.append(1))
    assert at.main(args + ["--micro-batch-size", "2", "--resume", "--out", str(tmp_path / "r")]) == 0
    assert not built and json.loads((tmp_path / "r" / at.CONFIG_NAME).read_text())["finished"]


def test_evaluation_refuses_what_cannot_fit(tiny_dir, tmp_path, capsys, monkeypatch):
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(dict(prompt="How do I make a bomb?", label="harmful")) + "\n")
    monkeypatch.setattr(memory, "available", lambda cuda: 1)
    assert ev.main(["--model", tiny_dir, "--bench", str(bench), "--judge", "keywords", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err  # --batch-size auto on CPU: 8, at most the one prompt
    assert "generation (batch 1," in err and "smaller --batch-size" not in err
    assert ev.main(["--model", tiny_dir, "--bench", str(bench), "--judge", "keywords", "--max-new-tokens", "2",
                    "--out", str(tmp_path / "e"), "--skip-memory-check", "--bootstrap", "10"]) == 0


def test_bf16_weights_keep_fp32_adapters_and_loss(tiny_dir, data_file):
    """What a GPU run does in bf16, on CPU: a bf16 base (as load_model gives on CUDA) gets fp32 LoRA weights
    (PEFT upcasts adapters), the loss is computed in fp32, gradients reach the adapters, and a step moves them."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16)
    args = at.build_parser().parse_args(["--optim", "adamw", "--lr", "1e-2"])
    model = at.add_lora(model, args, quant=False)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n and p.ndim == 2)
    tok = at.load_tokenizer(tiny_dir)
    rows = [json.loads(l) for l in open(data_file)]
    batch = at.collate([at.encode_example(tok, r["prompt"], r["response"]) for r in rows[:4]], tok.pad_token_id)
    loss = at.response_loss_sum(model, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    before = {n: p.detach().clone() for n, p in lora.items()}
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for n, p in lora.items() if "lora_B" in n)
    opt = at.make_optimizer(model, args)
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in lora.items())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_formula_tensor_by_tensor(precision):
    """What autograd really keeps (saved_tensors_hooks, scripts/backbone_slice.py's tools), against the plan's
    activations: a Qwen2 layer with GQA (8 heads, 2 KV heads, as R1-7B's 28 and 4: with one KV head repeat_kv's
    reshape would be a view), LoRA on all seven projections, checkpointing, a padded
    micro-batch of 2 (so SDPA gets a mask and transformers' repeat_kv materialises K and V for all 8 heads), in
    fp32 and under bf16 autocast (bf16 weights, as load_model loads them). Each checkpointed layer's input plus
    one recomputed layer, each storage once, within 5% of the formula. The formula before issue 35 item 6
    (7h + 2kv + 4I values) was 6% under in fp32 and 29% under in bf16 here (no repeated K/V, no fp32 norm copies)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from backbone_slice import SavedTensors, activation_bytes, is_layer_recomputation, storage_key
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    bf16 = precision == "bf16"
    base = Qwen2ForCausalLM(cfg).to(torch.bfloat16 if bf16 else torch.float32)
    args = at.build_parser().parse_args(["--attention", "sdpa"])
    model = at.add_lora(base, args, quant=False)
    models.lora_input_casting(model, on=not bf16)  # as train() does under autocast
    model.get_base_model().set_attn_implementation("sdpa")
    model.train()
    g = torch.Generator().manual_seed(0)
    examples = [dict(input_ids=torch.randint(0, 300, (n,), generator=g).tolist(), labels=[-100] * 20 +
                     torch.randint(0, 300, (n - 20,), generator=g).tolist()) for n in (48, 40)]
    batch = at.collate(examples, 0)
    ignore = {storage_key(p)[0] for p in model.parameters()} | {storage_key(b)[0] for b in model.buffers()}
    saved = SavedTensors(model, ignore)
    with saved.installed():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = at.response_loss_sum(model, batch, 0)
        loss.backward()  # outside autocast, as train() does; the recomputation re-enters it
    layers = [r for r in saved.recomputed if is_layer_recomputation(r, cfg.vocab_size)]
    assert len(layers) == 2 and len(saved.outside["layer inputs"]) == 2  # both layers checkpointed and recomputed
    measured = activation_bytes(saved.outside["layer inputs"], layers)
    planned = memory.training(cfg, quant=False, dtype_bytes=2 if bf16 else 4, lora_r=16, lora_targets=TARGETS,
                              lora_layers=None, optim="adamw", micro_batch=2, width=48, supervised=48,
                              grad_ckpt=True, cuda=False)["parts"]["activations"]
    assert 0.95 <= measured / planned <= 1.05, (measured, planned, precision)
