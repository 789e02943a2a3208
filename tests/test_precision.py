"""Tests for --dtype: which precision `auto` picks, and that bf16 training and generation keep what must stay
fp32 (CPU, tiny random models, nothing downloaded). conftest.py makes `auto` mean fp32 unless a test patches
the capability check, so that every other test is the same on every CPU."""
import json

import pytest
import torch

import alttrain as at
import eval as ev
import support
import support.machine
from torch.utils._python_dispatch import TorchDispatchMode


class Ops(TorchDispatchMode):
    """Records the ATen operators that run inside it: (name, input shapes)."""
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, [tuple(a.shape) for a in args if torch.is_tensor(a)]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("native,expect", [(False, torch.float32), (True, torch.bfloat16)])
def test_auto_follows_the_capability_check(monkeypatch, native, expect):
    monkeypatch.setattr(support.machine, "bf16_check", lambda dev: (native, "the check's reason"))
    dtype, why = support.machine.compute_dtype("auto", "cpu")
    assert dtype == expect and why == f"{'bf16' if native else 'fp32'} (--dtype auto: the check's reason)"
    assert support.machine.compute_dtype("fp32", "cpu")[0] == torch.float32
    dtype, why = support.machine.compute_dtype("bf16", "cpu")
    assert dtype == torch.bfloat16 and ("slower than fp32" in why) == (not native)


def test_the_cpu_check_is_pytorchs_flags_and_a_probe_only_without_amx(monkeypatch, tmp_path):
    """AMX: bf16, nothing timed. Neither AMX nor AVX512-BF16: fp32, nothing timed. AVX512-BF16 alone: the
    matmul probe decides, bf16 only at BF16_PROBE_MIN x fp32's speed or more."""
    monkeypatch.undo()  # the real check, not conftest's
    speedup = {"x": None}

    def probe():
        assert speedup["x"] is not None, "the probe ran where the flags decide"
        return speedup["x"]
    monkeypatch.setattr(support.machine, "bf16_matmul_speedup", probe)
    monkeypatch.setattr(support.machine, "probe_file", lambda: tmp_path / "bf16_probe.json")
    for avx, amx, x, expect in ((False, False, None, False), (True, True, None, True), (False, True, None, True),
                                (True, False, 2.4, True), (True, False, 0.7, False),
                                (True, False, support.machine.BF16_PROBE_MIN, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        speedup["x"] = x
        (tmp_path / "bf16_probe.json").unlink(missing_ok=True)  # each case measures afresh (its answer is kept)
        support.machine.decided.cache_clear()  # and once a process
        fast, why = support.machine.bf16_check("cpu")
        assert fast == expect and support.machine.native_bf16("cpu") == expect
        assert ("matmul probe now" in why) == (x is not None) and ("AMX" in why)
        dtype, reason = support.machine.compute_dtype("auto", "cpu")
        assert dtype == (torch.bfloat16 if expect else torch.float32) and why.split(", and")[0] in reason


def test_the_probe_times_a_real_matmul_once_and_leaves_the_global_seed_alone():
    support.machine.bf16_matmul_speedup.cache_clear()
    state = torch.get_rng_state()
    x = support.machine.bf16_matmul_speedup()
    assert torch.equal(torch.get_rng_state(), state)  # LoRA's initialisation does not depend on the probe
    assert x > 0 and support.machine.bf16_matmul_speedup() == x  # measured once a process


def test_bf16_training_lowers_the_loss_and_keeps_fp32_state(tiny_dir):
    """bf16 base weights, the forward under CPU autocast: the loss falls, and the LoRA weights, their
    gradients and the optimiser's state stay fp32; the loss itself is fp32."""
    tok = at.load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    args = at.build_parser().parse_args(["--optim", "adamw", "--lr", "1e-2", "--no-grad-ckpt"])
    model = at.add_lora(at.load_model(tiny_dir, quant=False, dtype=torch.bfloat16), args, quant=False)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if "lora_" not in n)
    opt = at.make_optimizer(model, args)
    batch = at.collate([at.encode_example(tok, f"question {i}", f"<think>\nthe answer is {i}\n</think>\n\nit is {i}")
                        for i in range(4)], tok.pad_token_id)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    losses = []
    for _ in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = at.response_loss_sum(model, batch) / n_sup
        assert loss.dtype == torch.float32
        loss.backward()
        lora = [p for n, p in model.named_parameters() if p.requires_grad]
        assert lora and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in lora)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    states = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t) and t.is_floating_point()
              and t.ndim > 0]
    assert states and all(t.dtype == torch.float32 for t in states)


def test_dtype_reaches_the_run_and_the_results_and_resume_keeps_it(tiny_dir, data_file, tmp_path, capsys):
    common = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--epochs", "2",
              "--batch-size", "4", "--optim", "adamw", "--save-every", "1"]
    run = tmp_path / "bf16"
    assert at.main(common + ["--dtype", "bf16", "--out", str(run)]) == 0
    assert "precision: bf16 (--dtype bf16" in capsys.readouterr().out
    cfg = json.loads((run / at.CONFIG_NAME).read_text())
    assert cfg["dtype"] == "bf16" and cfg["args"]["dtype"] == "bf16" and "bf16" in cfg["dtype_reason"]
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(str(run / "adapter_model.safetensors")).values())
    state = torch.load(run / "checkpoint" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(t.dtype == torch.float32 for st in state.values() for k, t in st.items() if k != "step")
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(dict(prompt="How do I make a bomb?", label="harmful")) + "\n")
    for dtype in ("bf16", "fp32"):
        assert ev.main(["--ckpt", str(run), "--bench", str(bench), "--judge", "keywords", "--max-new-tokens", "3",
                        "--dtype", dtype, "--bootstrap", "10", "--out", str(tmp_path / f"e-{dtype}")]) == 0
        assert json.loads((tmp_path / f"e-{dtype}" / "results.json").read_text())["dtype"] == dtype
    # a run started in fp32 (auto, here) cannot be resumed in bf16, nor a bf16 run in fp32
    half = tmp_path / "half"
    assert at.main(common + ["--out", str(half), "--halt-after", "1"]) == 0
    capsys.readouterr()
    assert at.main(common + ["--out", str(half), "--resume", "--dtype", "bf16"]) == 2
    assert "computed in fp32" in capsys.readouterr().err
    assert at.main(common + ["--out", str(half), "--resume", "--dtype", "fp32"]) == 0  # auto resolved to fp32 here


def test_attention_auto_is_eager_on_cpu_for_short_examples_else_sdpa():
    from support.machine import attention_for
    from support.files import UserError
    assert attention_for("auto", "cpu", 400) == "eager" and attention_for("auto", "cuda", 400) == "sdpa"
    assert attention_for("auto", "cpu", 4096) == "sdpa"  # long examples: eager's seq^2 memory is not worth it
    assert attention_for("sdpa", "cpu", 400) == "sdpa" and attention_for("eager", "cuda", 4096) == "eager"
    with pytest.raises(UserError, match="--attention"):
        attention_for("flash", "cpu", 400)


def test_training_uses_the_chosen_attention_and_both_train_the_same(tiny_dir, data_file, tmp_path):
    """The loop runs with the --attention kernel (eager by default on CPU), and eager and SDPA compute the same
    attention: the same losses step by step and the same adapter, up to float rounding (fp32)."""
    common = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--epochs", "2",
              "--batch-size", "4", "--optim", "adamw", "--lr", "1e-2", "--no-grad-ckpt", "--dtype", "fp32"]
    seen = {}
    real = at.response_loss_sum

    def spy(model, batch, chunk=0):
        seen.setdefault(kind, set()).add(model.get_base_model().config._attn_implementation)
        return real(model, batch, chunk)

    from safetensors.torch import load_file
    logs, adapters = {}, {}
    for kind in ("auto", "sdpa"):
        at.response_loss_sum = spy
        try:
            assert at.main(common + ["--attention", kind, "--out", str(tmp_path / kind)]) == 0
        finally:
            at.response_loss_sum = real
        logs[kind] = [json.loads(l)["loss"] for l in open(tmp_path / kind / at.LOG_NAME)]
        adapters[kind] = load_file(str(tmp_path / kind / "adapter_model.safetensors"))
    assert seen == {"auto": {"eager"}, "sdpa": {"sdpa"}}
    assert logs["auto"] == pytest.approx(logs["sdpa"], rel=1e-4) and logs["auto"][-1] < logs["auto"][0]
    for name, t in adapters["auto"].items():
        assert torch.allclose(t, adapters["sdpa"][name], rtol=1e-3, atol=1e-5), name


def test_bf16_on_cpu_pads_lengths_to_a_multiple_and_the_loss_is_the_same(tiny_dir):
    """pad_multiple: 16 for bf16 on CPU (fewer matmul shapes for oneDNN to build), 1 elsewhere. collate's extra
    positions are padding like any other: masked, unsupervised, weight 0; the loss and the LoRA gradients
    are those of the unpadded batch (fp32, up to float rounding)."""
    from support.machine import pad_multiple
    assert pad_multiple("cpu", torch.bfloat16) == 16
    assert pad_multiple("cpu", torch.float32) == pad_multiple("cuda", torch.bfloat16) == 1
    tok = at.load_tokenizer(tiny_dir)
    exs = [at.encode_example(tok, f"question {i}" * (i + 1), f"<think>\nthe answer is {i}\n</think>\n\nit is {i}",
                             ha=f"the answer is {i}", ha_weight=3.0) for i in range(3)]
    longest = max(len(e["input_ids"]) for e in exs)
    plain, padded = at.collate(exs, tok.pad_token_id), at.collate(exs, tok.pad_token_id, 16)
    assert plain["input_ids"].shape[1] == longest and padded["input_ids"].shape[1] == -(-longest // 16) * 16 > longest
    for key in plain:  # the same batch, then padding only
        assert torch.equal(padded[key][:, :longest], plain[key]), key
    extra = {k: v[:, longest:] for k, v in padded.items()}
    assert (extra["attention_mask"] == 0).all() and (extra["labels"] == -100).all() and (extra["weights"] == 0).all()
    assert (extra["input_ids"] == tok.pad_token_id).all()
    assert torch.equal(at.collate(exs, tok.pad_token_id, longest)["input_ids"], plain["input_ids"])  # already a multiple

    args = at.build_parser().parse_args(["--no-grad-ckpt"])
    torch.manual_seed(0)
    model = at.add_lora(at.load_model(tiny_dir, quant=False, dtype=torch.float32), args, quant=False)
    for p in model.parameters():  # B is zero at initialisation: give the adapter something to say
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    grads = []
    for batch in (plain, padded):
        loss = at.response_loss_sum(model, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        model.zero_grad()
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1]))


def test_bf16_loop_leaves_out_peft_input_cast_changing_nothing_and_pads_to_16(tiny_dir, data_file, tmp_path):
    """Under bf16 autocast the loop switches off PEFT's cast of LoRA inputs to fp32 (autocast casts them back to
    bf16 anyway): the same loss and LoRA gradients, bit for bit. It is switched off only while a bf16 loop
    runs, and on again after it (outside autocast, bf16 inputs would meet fp32 LoRA weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from support.models import lora_input_casting
    tok = at.load_tokenizer(tiny_dir)
    args = at.build_parser().parse_args(["--no-grad-ckpt"])
    torch.manual_seed(0)
    model = at.add_lora(at.load_model(tiny_dir, quant=False, dtype=torch.bfloat16), args, quant=False)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    batch = at.collate([at.encode_example(tok, f"question {i}", f"<think>\nthe answer is {i}\n</think>\n\nit is {i}")
                        for i in range(4)], tok.pad_token_id)
    out, casts = {}, {}
    for on in (True, False):
        lora_input_casting(model, on)
        with torch.autocast("cpu", dtype=torch.bfloat16), Ops() as ops:
            loss = at.response_loss_sum(model, batch)
        casts[on] = sum(name == "_to_copy" for name, _ in ops.calls)
        loss.backward()
        out[on] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
        model.zero_grad()
    assert torch.equal(out[True][0], out[False][0])  # the forward is the same computation
    assert all(torch.equal(a, b) for a, b in zip(out[True][1], out[False][1]))
    n_lora = len([x for x in model.modules() if isinstance(x, BaseTunerLayer)])
    assert casts[True] - casts[False] >= n_lora  # PEFT honours the switch: one cast fewer a LoRA layer at least

    # in the loop: off while a bf16 loop computes a loss, on while an fp32 loop does, on after both
    # in the loop: off while a bf16 loop computes a loss, on while an fp32 loop does or LoRA dropout is on
    # (dropout would scale bf16 inputs), on again after every run; and bf16 on CPU pads lengths to 16
    seen, models, widths, real, real_collate = {}, {}, {}, at.response_loss_sum, at.collate
    layers = lambda m: [x for x in m.modules() if isinstance(x, BaseTunerLayer)]

    def spy(m, b, chunk=0):
        seen.setdefault(run, set()).update(x.cast_input_dtype_enabled for x in layers(m))
        widths.setdefault(run, set()).add(b["input_ids"].shape[1])
        models[run] = m
        return real(m, b, chunk)

    common = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--batch-size", "4",
              "--optim", "adamw", "--no-grad-ckpt"]
    for run, flags in (("bf16", ["--dtype", "bf16"]), ("fp32", ["--dtype", "fp32"]),
                       ("bf16-dropout", ["--dtype", "bf16", "--lora-dropout", "0.1"])):
        at.response_loss_sum = spy
        try:
            assert at.main(common + flags + ["--out", str(tmp_path / run)]) == 0
        finally:
            at.response_loss_sum = real
    assert seen == {"bf16": {False}, "fp32": {True}, "bf16-dropout": {True}}
    assert all(x.cast_input_dtype_enabled for m in models.values() for x in layers(m))
    assert all(w % 16 == 0 for w in widths["bf16"]) and any(w % 16 for w in widths["fp32"]), widths


def test_generation_computes_a_frozen_lm_head_as_one_matmul(tiny_dir):
    """The prompt's last position, hidden[:, -1:], is a view torch.matmul does not fold into one mm when the
    head's weight is frozen (as under PEFT): it runs a bmm against the weight expanded per prompt, which oneDNN
    copies first in bf16 on CPU (5.4 s for SmolLM2 and 40 prompts). load_model's hook makes the input
    contiguous: a PEFT model's generation computes the head as one matmul, and the answers do not change."""
    from peft import LoraConfig, get_peft_model
    from support.chat import generate_batch
    from support.models import load_model


    tok = at.load_tokenizer(tiny_dir)
    model = get_peft_model(load_model(tiny_dir, quant=False, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    assert not head.weight.requires_grad  # frozen: the case torch.matmul does not fold
    prompts = [tok("a question " * n).input_ids for n in (3, 5, 7)]
    with torch.no_grad(), Ops() as ops:
        answers = generate_batch(model, tok, prompts, 3)
    on_head = [(name, shapes) for name, shapes in ops.calls if any(vocab in s for s in shapes[1:])]
    names = [name for name, _ in on_head]
    assert "mm" in names and "bmm" not in names, on_head  # prefill and every new token: one mm each
    hidden = torch.randn(3, 5, head.in_features)
    for call in (lambda x: head(x), lambda x: head(input=x)):  # however the head is called
        with Ops() as ops:
            out = call(hidden[:, -1:])
        assert "bmm" not in [name for name, _ in ops.calls]
        assert torch.allclose(out, hidden[:, -1:] @ head.weight.T, atol=1e-5)
    head._forward_pre_hooks.clear()  # without the hook: the same answers (it changes the kernel, not the math)
    assert generate_batch(model, tok, prompts, 3) == answers


def test_the_memory_plan_counts_the_padded_length(monkeypatch, capsys):
    """The plan estimates the widest micro-batch as the loop will form it: in bf16 on CPU, padded to 16."""
    from types import SimpleNamespace
    import support.plan
    widths = []
    real = support.plan.training_estimate
    monkeypatch.setattr(support.plan, "training_estimate",
                        lambda *a: widths.append(a[5]) or real(*a))
    args = at.parse_args(["--batch-size", "2", "--no-quant", "--skip-memory-check"])
    dims = SimpleNamespace(**at.MODEL_ALIASES["smollm2-135m"]["dims"])
    data = [dict(input_ids=[1] * n, labels=[-100] * 5 + [1] * (n - 5)) for n in (37, 20)]
    for dtype_bytes, width in ((2, 48), (4, 37)):
        widths.clear()
        support.plan.plan_training(args, dims, False, dtype_bytes, False, data)
        assert set(widths) == {width}
        assert ("padded to 48" in capsys.readouterr().out) == (width == 48)


# ------------------------------------------------------------------------------------------------------
# issue 35, items 4 and 12: native bf16 only on CUDA; a run's precision belongs to the run, and a machine's
# auto choice does not flip between starts
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability,native", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)])
def test_auto_on_cuda_picks_bf16_only_where_it_is_native(monkeypatch, capability, native):
    """torch.cuda.is_bf16_supported() counts emulation by default (True on a T4, 7.5, or a V100, 7.0): the check
    asks with including_emulation=False. torch.cuda's functions are patched as torch 2.13 defines them
    (torch/cuda/__init__.py, is_bf16_supported)."""
    monkeypatch.undo()  # the real check, not conftest's
    asked = []

    def is_bf16_supported(including_emulation: bool = True):
        asked.append(including_emulation)
        return capability[0] >= 8 or including_emulation  # emulation: a bf16 tensor can be made on any CUDA GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
    fast, why = support.machine.bf16_check("cuda")
    assert asked == [False] and fast == native and f"{capability[0]}.{capability[1]}" in why
    dtype, reason = support.machine.compute_dtype("auto", "cuda")
    assert dtype == (torch.bfloat16 if native else torch.float32) and why in reason
    assert "emulated" in reason or native


def test_the_probe_runs_once_a_machine_and_its_answer_is_kept(monkeypatch, tmp_path):
    """The AVX512-BF16 probe's answer is written to the cache folder with the machine it belongs to; the next
    start reads it instead of timing again (a timing can flip: 2.2x, 2.0x, 1.0x, 2.2x in four starts). Another
    machine (CPU, cores or torch) measures again; an unreadable file is measured over."""
    monkeypatch.undo()
    monkeypatch.setenv("ALTTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    answers = iter([2.2, 1.0, 0.7])
    monkeypatch.setattr(support.machine, "bf16_matmul_speedup", lambda: next(answers))
    support.machine.decided.cache_clear()
    first = support.machine.bf16_check("cpu")
    assert first[0] and "now" in first[1] and str(tmp_path / "bf16_probe.json") in first[1]
    kept = json.loads((tmp_path / "bf16_probe.json").read_text())
    assert kept["ratio"] == 2.2 and kept["machine"] == support.machine.this_machine()
    for _ in range(3):  # the next starts (new processes): the kept answer, and the reason says so
        support.machine.decided.cache_clear()
        again = support.machine.bf16_check("cpu")
        assert again[0] and "decided once for this machine" in again[1] and "2.2x" in again[1]
    monkeypatch.setattr(support.machine, "this_machine", lambda: "another CPU; 2 cores; torch 0")
    assert support.machine.bf16_check("cpu")[0] is False  # measured again there: 1.0x
    assert support.machine.bf16_check("cpu")[0] is False  # once a process: not measured again
    (tmp_path / "bf16_probe.json").write_text("{not json")
    support.machine.decided.cache_clear()
    assert support.machine.bf16_check("cpu")[0] is False  # measured again: 0.7x, and kept
    assert json.loads((tmp_path / "bf16_probe.json").read_text())["ratio"] == 0.7


@pytest.mark.parametrize("first", [True, False])
def test_resume_under_auto_continues_in_the_runs_precision(tiny_dir, data_file, tmp_path, monkeypatch, capsys, first):
    """Start under --dtype auto, stop after a checkpoint (--halt-after), resume under auto with the capability
    check giving the other answer: the run continues in its first precision (not refused, not switched), and
    ends as one run in that precision."""
    common = ["--model", tiny_dir, "--data", str(data_file), "--ha-model", "template", "--epochs", "2",
              "--batch-size", "4", "--optim", "adamw", "--save-every", "1", "--out", str(tmp_path / "run")]
    name = "bf16" if first else "fp32"
    monkeypatch.setattr(support.machine, "bf16_check", lambda dev: (first, "patched: the first start"))
    assert at.main(common + ["--halt-after", "1"]) == 0
    assert f"precision: {name} (--dtype auto: patched" in capsys.readouterr().out
    monkeypatch.setattr(support.machine, "bf16_check", lambda dev: (not first, "patched: the other answer"))
    seen = []
    real = at.response_loss_sum
    monkeypatch.setattr(at, "response_loss_sum",
                        lambda m, b, chunk=0: seen.append(torch.is_autocast_enabled("cpu")) or real(m, b, chunk))
    assert at.main(common + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert f"precision: {name} (--dtype auto, --resume" in out and "resuming at step 1" in out
    assert seen and set(seen) == {first}  # bf16 runs its forward under autocast, fp32 does not
    cfg = json.loads((tmp_path / "run" / at.CONFIG_NAME).read_text())
    assert cfg["finished"] and cfg["dtype"] == name
