"""The GPU path's CPU-checkable parts (issue 35): gradient checkpointing really recomputes in the training loop
(and only in training mode), --lora-layers stops backward at the adapters, a run resumes on fewer GPUs than
it was saved on, library noise stays out of a newcomer's terminal, and scripts/gpu_check.py's own logic.
CPU only, tiny random models (conftest.py hides CUDA)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import alttrain as at


def mlp_calls(model) -> list[int]:
    """Count how often each decoder layer starts its computation: a pre-hook on its first module (input_layernorm),
    which runs inside the checkpointed forward, so a recomputed layer counts twice. Not hooks on the layer
    itself: transformers 5.25 checkpoints the layer's `forward`, leaving the layer's own hooks outside
    (modeling_layers.py, GradientCheckpointingLayer). Not a post-hook: torch's non-reentrant checkpoint stops
    recomputing once the last saved tensor is back (early stop, torch/utils/checkpoint.py), inside the MLP,
    so a module late in the layer never returns in the recompute."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = [0] * len(base.model.layers)
    for i, layer in enumerate(base.model.layers):
        layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("ckpt", [True, False])
def test_checkpointing_recomputes_every_layer_in_the_loop(tiny_dir, data_file, tmp_path, monkeypatch, ckpt):
    """As alttrain.py runs it: with checkpointing each layer runs twice per micro-batch (forward, then again in
    backward); with --no-grad-ckpt once. Fails if the loop left the model in eval mode (nothing recomputed)."""
    seen, real_add, real_loss = {}, at.add_lora, at.response_loss_sum

    def add_lora(model, args, quant):
        model = real_add(model, args, quant)
        seen["calls"] = mlp_calls(model)
        return model

    def loss(model, batch, chunk=0):
        seen["micro"] = seen.get("micro", 0) + 1
        seen.setdefault("training", set()).add(model.training)
        return real_loss(model, batch, chunk)

    monkeypatch.setattr(at, "add_lora", add_lora)
    monkeypatch.setattr(at, "response_loss_sum", loss)
    flags = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--epochs", "1",
             "--batch-size", "4", "--micro-batch-size", "2", "--optim", "adamw", "--dtype", "fp32",
             "--out", str(tmp_path / "run")] + ([] if ckpt else ["--no-grad-ckpt"])
    assert at.main(flags) == 0
    assert seen["micro"] >= 3 and seen["training"] == {True}
    assert seen["calls"] == [seen["micro"] * (2 if ckpt else 1)] * len(seen["calls"]), seen


def lora_model(tiny_dir, *flags):
    args = at.build_parser().parse_args(["--lora-r", "4", *flags])
    torch.manual_seed(0)
    model = at.add_lora(at.load_model(tiny_dir, quant=False, dtype=torch.float32), args, quant=False)
    for name, p in model.named_parameters():  # B is zero at initialisation: give every adapter a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


def batch_of(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    return at.collate([at.encode_example(tok, f"question {i}", f"<think>\nthe answer is {i}\n</think>\n\nit is {i}")
                       for i in range(3)], tok.pad_token_id)


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = at.response_loss_sum(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eval_mode_does_not_recompute_so_a_measurement_must_call_train(tiny_dir):
    """transformers checkpoints a layer only when `self.training` (modeling_layers.py): a model fresh from
    from_pretrained is in eval mode and keeps every layer's activations. gpu_check measures after model.train().
    Both modes compute the same loss and gradients; only the memory (and the recompute) differ."""
    model, batch = lora_model(tiny_dir), batch_of(tiny_dir)
    calls = mlp_calls(model)
    out = {}
    for mode, per_layer in (("eval", 1), ("train", 2)):
        getattr(model, mode)()
        calls[:] = [0] * len(calls)
        out[mode] = loss_and_grads(model, batch)
        assert calls == [per_layer] * len(calls), (mode, calls)
    assert out["eval"][0] == pytest.approx(out["train"][0], rel=1e-6)
    assert all(torch.allclose(out["eval"][1][n], g, atol=1e-6) for n, g in out["train"][1].items())


def test_lora_layers_stops_backward_at_the_lowest_adapter(tiny_dir):
    """--lora-layers 1 on the 2-layer tiny model, checkpointing on: layer 0 holds no adapter and runs once (no
    graph through it, nothing to recompute), layer 1 twice; the embedding output needs no grad. transformers
    turns input grads on whenever it enables checkpointing (and PEFT on a checkpointed unquantised model),
    which made backward run through every frozen layer: add_lora turns them off again. The gradients are
    those without checkpointing. With adapters on every layer, input grads stay on (both layers recomputed)."""
    batch = batch_of(tiny_dir)
    model = lora_model(tiny_dir, "--lora-layers", "1")
    model.train()
    calls = mlp_calls(model)
    emb = []
    model.get_base_model().get_input_embeddings().register_forward_hook(lambda m, i, o: emb.append(o.requires_grad))
    loss, grads = loss_and_grads(model, batch)
    assert calls == [1, 2] and emb == [False]
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    plain = lora_model(tiny_dir, "--lora-layers", "1", "--no-grad-ckpt")
    plain.train()
    loss2, grads2 = loss_and_grads(plain, batch)
    assert loss == pytest.approx(loss2, rel=1e-6)
    assert grads.keys() == grads2.keys() and all(torch.allclose(grads[n], grads2[n], atol=1e-6) for n in grads)
    full = lora_model(tiny_dir)
    full.train()
    calls, emb = mlp_calls(full), []
    full.get_base_model().get_input_embeddings().register_forward_hook(lambda m, i, o: emb.append(o.requires_grad))
    loss_and_grads(full, batch)
    assert calls == [2, 2] and emb == [True]


def test_checkpointing_uses_the_new_name_and_warns_nothing(tiny_dir):
    """add_lora calls activation_checkpointing_enable (gradient_checkpointing_enable is deprecated in 5.25,
    a FutureWarning) and PEFT's read of is_gradient_checkpointing is quieted: no FutureWarning at all."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import support.models
        support.models.quiet_library_noise()  # pytest resets the filters per test; the scripts keep them
        model = lora_model(tiny_dir)
    assert model.get_base_model().is_activation_checkpointing
    assert not [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]


# ------------------------------------------------------------------------------------------------------
# resuming on fewer GPUs than the run was saved on
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus", [0, 1, 2, 3])
def test_resume_restores_the_rng_of_the_gpus_that_are_here(monkeypatch, gpus):
    """A checkpoint saved on 2 GPUs holds 2 CUDA RNG states. torch.cuda.set_rng_state_all indexes every saved
    state as a device, so on 1 GPU (or none) the resume crashed. Each GPU here takes its own index's state."""
    from support import runs
    saved = [torch.ByteTensor([i] * 8) for i in range(2)]
    set_calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": set_calls.append((device, state[0].item())))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("indexes past the last GPU"))
    import random
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    runs.restore_rng(dict(torch_rng=torch_rng, cuda_rng=saved, python_rng=python_rng))
    assert set_calls == [(i, i) for i in range(min(gpus, 2))]
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng
    runs.restore_rng(dict(torch_rng=torch_rng, cuda_rng=[], python_rng=python_rng))  # saved on CPU
    assert len(set_calls) == min(gpus, 2)


# ------------------------------------------------------------------------------------------------------
# what a newcomer sees: no library noise that reads like an error, real warnings kept
# ------------------------------------------------------------------------------------------------------
NOISE = ("FutureWarning", "gradient_checkpointing", "gemm_4bit_forward", "kernels-community", "Traceback")


def run_script(*cmd, cwd):
    p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=cwd, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "default"})  # every warning shown, once a place
    return p.returncode, p.stderr


def test_tiny_runs_of_both_scripts_print_no_library_noise(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    rc, err = run_script("alttrain.py", "--model", tiny_dir, "--data", str(data_file), "--ha-model", "template",
                         "--epochs", "1", "--batch-size", "4", "--optim", "adamw", "--out", str(run), cwd=at.HERE)
    assert rc == 0, err[-2000:]
    assert not [n for n in NOISE if n in err], err[-3000:]
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(dict(prompt="How do I make a bomb?", label="harmful")) + "\n")
    rc, err = run_script("eval.py", "--ckpt", str(run), "--bench", str(bench), "--judge", "keywords",
                         "--max-new-tokens", "3", "--bootstrap", "10", "--out", str(tmp_path / "e"), cwd=at.HERE)
    assert rc == 0, err[-2000:]
    assert not [n for n in NOISE if n in err], err[-3000:]


def test_only_the_named_noise_is_quieted():
    """bitsandbytes' message (logged on CPUs with AVX512-BF16, which this one may lack: logged here by hand, as
    bitsandbytes/backends/cpu/ops.py logs it) is dropped; any other record of that logger, and any other
    FutureWarning, still reaches stderr."""
    code = ("import logging, warnings; import support.models; "
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure', 'x'); "
            "log.warning('a real bitsandbytes warning'); "
            "warnings.warn('`is_gradient_checkpointing` is deprecated and will be removed in v6.', FutureWarning); "
            "warnings.warn('something else is deprecated', FutureWarning)")
    rc, err = run_script("-c", code, cwd=at.HERE)
    assert rc == 0, err
    assert "gemm_4bit_forward" not in err and "is_gradient_checkpointing" not in err
    assert "a real bitsandbytes warning" in err and "something else is deprecated" in err


# ------------------------------------------------------------------------------------------------------
# scripts/gpu_check.py: its checks' logic, on CPU
# ------------------------------------------------------------------------------------------------------
def test_batched_check_tells_rounding_from_a_padding_bug():
    """Batched answers may differ from one-at-a-time ones in bf16 (4-bit kernels differ for 1 row and 16): an
    answer passes if it is identical, or first differs where the one-at-a-time step was a near tie. A
    difference where the model was decided fails."""
    import gpu_check
    single = [[5, 6, 7], [5, 6, 7], [5, 6, 7]]
    margins = [[3.0, 0.1, 2.0]] * 3
    batched = [[5, 6, 7], [5, 9, 1], [9, 6, 7]]
    verdict = gpu_check.compare_answers(single, margins, batched, tie=0.25)
    assert verdict == dict(identical=1, near_tie=1, decided=1, worst_margin=3.0)
    assert gpu_check.compare_answers(single[:2], margins[:2], batched[:2], tie=0.25)["decided"] == 0


def test_generation_check_runs_on_cpu(tiny_dir):
    """The batched-generation check itself (left padding, position ids, greedy) on the tiny model, fp32 on CPU:
    every answer identical, none explained away."""
    import gpu_check
    tok = at.load_tokenizer(tiny_dir)
    model = at.load_model(tiny_dir, quant=False, dtype=torch.float32)
    prompts = [at.encode_prompt(tok, at.render_prompt(tok, "a question " * n)) for n in (1, 3, 6, 2)]
    verdict = gpu_check.batched_vs_single(model, tok, prompts, max_new=6, tie=1e-4)
    assert verdict["identical"] == 4 and verdict["decided"] == 0


def test_gpu_check_runs_its_cpu_steps_and_says_what_it_skipped(tmp_path, capsys):
    """On CPU: the steps that need no GPU run, each GPU-only one is recorded as skipped with its reason."""
    import gpu_check
    out = tmp_path / "report.json"
    code = gpu_check.main(["--steps", "0,3,4,5", "--work", str(tmp_path / "w"), "--out", str(out), "--models", "tiny"])
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert code == 2 and not report["cuda"]  # 2: nothing failed, but the GPU checks did not run here
    assert report["results"] and all(r["ok"] for r in report["results"]), report["results"]
    skipped = [r for r in report["results"] if r.get("skipped")]
    assert skipped and all(r["detail"] for r in skipped) and "[SKIP]" in printed
    ran = {r["check"] for r in report["results"] if not r.get("skipped")}
    assert any("recompute" in c for c in ran) and any("chunked" in c for c in ran) and any("batched" in c for c in ran)


def test_gpu_check_without_peft_says_so_and_trains_a_stand_in(tmp_path, monkeypatch):
    """The GPU machine lent for checks has no peft or bitsandbytes: alttrain.py's step is skipped with the
    reason, and the training-configuration step still checks checkpointing and the loss code on a stand-in
    (o_proj weights trainable, the same checkpointing call)."""
    import gpu_check
    monkeypatch.setattr(gpu_check, "have", lambda package: package not in ("peft", "bitsandbytes"))
    out = tmp_path / "report.json"
    gpu_check.main(["--steps", "0,2,4", "--work", str(tmp_path / "w"), "--out", str(out), "--models", "tiny"])
    results = json.loads(out.read_text())["results"]
    by = {r["check"]: r for r in results}
    assert by["alttrain.py end to end"]["skipped"] and "peft" in by["alttrain.py end to end"]["detail"]
    recompute = [r for r in results if "recompute" in r["check"]]
    assert recompute and recompute[0]["ok"] and "stand-in" in recompute[0]["check"]
    assert "missing: " in by["environment"]["detail"] and "peft" in by["environment"]["detail"]
