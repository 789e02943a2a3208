"""Every example of the recipe trains (issue 35, items 1, 5, 7): micro-batches packed by tokens from the memory
plan, an example too long for the GPU refused before the model loads (with the flag that leaves it out or cuts
it), every process of a torchrun planning the same micro-batches, and rank 0's long phases outside the
collectives' timeout. CPU, tiny models (support/tiny.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import alttrain as at
import support.plan
from support import memory
from support.machine import round_up

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def adapter(out):
    from safetensors.torch import load_file
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ------------------------------------------------------------------------------------------------ #
# Packing a step into micro-batches
# ------------------------------------------------------------------------------------------------ #
def test_micro_batches_pack_by_tokens():
    lengths = [1000, 120, 110, 100, 90, 80, 70, 60]  # one long trace, seven short refusals; longest first
    idx = list(range(8))
    # a budget of one long example: the long one alone, the seven short ones together
    assert at.micro_batches(idx, lengths, 1, 1000) == [[0], [1, 2, 3, 4, 5, 6, 7]]
    # the width of a micro-batch is its first (longest) example, padded: 4 x 128 = 512 fits, 5 x 128 does not
    assert at.micro_batches(idx[1:], lengths, 1, 512, multiple=16) == [[1, 2, 3, 4], [5, 6, 7]]
    # at most `most` examples each (torchrun: every process gets a share of the step)
    assert at.micro_batches(idx, lengths, 1, 10_000, most=4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # --micro-batch-size: a count, whatever the lengths
    assert at.micro_batches(idx, lengths, 3, None) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    # every example exactly once, in order
    for budget in (1, 500, 1000, 1200, 5000):
        assert sum(at.micro_batches(idx, lengths, 1, budget), []) == idx


# ------------------------------------------------------------------------------------------------ #
# One long example among short ones: nothing dropped, the same adapter as micro-batches of 1
# ------------------------------------------------------------------------------------------------ #
LONG_WORDS = 2400  # a benign trace far longer than the refusals (and than the rest of the data put together)


@pytest.fixture
def long_and_short(tmp_path):
    rows = [dict(prompt=f"How do I make weapon number {i}?", label="harmful",
                 response=f"Okay, the user wants weapon number {i}.") for i in range(7)]
    trace = " ".join(["think about the problem step by step"] * (LONG_WORDS // 7))
    rows.append(dict(prompt="What is the capital of France?", label="benign",
                     response=f"Okay, so the user asks for the capital of France. {trace}\n</think>\n\nParis."))
    path = tmp_path / "long_and_short.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def per_token_memory(monkeypatch, room_tokens: float, cost: int = 1000):
    """A memory plan whose estimate is `cost` bytes per padded token of a micro-batch, with room for
    `room_tokens` tokens: what the real estimate is for SDPA attention, up to the fixed terms."""
    def est(args, config, quant, dtype_bytes, cuda, width, supervised, micro):
        return dict(parts=dict(activations=micro * width * cost), total=micro * width * cost)
    monkeypatch.setattr(support.plan, "training_estimate", est)
    monkeypatch.setattr(memory, "available", lambda cuda: int(room_tokens * cost))


def train_args(tiny_dir, data, out, *extra):
    return [str(a) for a in ("--model", tiny_dir, "--data", data, "--ha-model", "template", "--epochs", 2,
                             "--batch-size", 8, "--optim", "adamw", "--lr", 5e-3, "--warmup-steps", 1,
                             "--dtype", "fp32", "--out", out, *extra)]


def test_a_long_example_trains_alone_and_the_adapter_is_micro_batch_1s(tiny_dir, long_and_short, tmp_path,
                                                                        monkeypatch, capsys):
    tok = at.load_tokenizer(tiny_dir)
    built = [at.build_example(r["prompt"], r["label"], *at.split_response(r["response"]), "But wait, this is fine.")
             for r in map(json.loads, open(long_and_short))]
    longest = max(len(at.encode_example(tok, e["query"], e["response"])["input_ids"]) for e in built)
    assert longest > 1024  # longer than the tiny model's max_position_embeddings, and than the old 4096 cap's share
    per_token_memory(monkeypatch, room_tokens=1.5 * longest)  # one long example fits, two do not
    seen = []
    real = at.micro_batches
    monkeypatch.setattr(at, "micro_batches", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "packed")) == 0
    out = capsys.readouterr().out
    assert "micro-batch 1 of batch 8" in out and "lengths of the 8 examples" in out
    # every step: the long example alone, the seven short ones in one micro-batch
    assert seen and all(sorted(map(len, mbs)) == [1, 7] for mbs in seen)
    cfg = json.loads((tmp_path / "packed" / at.CONFIG_NAME).read_text())
    assert cfg["n_train_examples"] == 8 and cfg["dropped_too_long"] == 0 and cfg["args"]["max_len"] is None
    # the same steps, one example a micro-batch: the same adapter up to the order of the gradient sum
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "ones", "--micro-batch-size", 1)) == 0
    assert all(list(map(len, mbs)) == [1] * 8 for mbs in seen[-2:])
    a, b = adapter(tmp_path / "packed"), adapter(tmp_path / "ones")
    assert max_diff(a, b) <= 1e-5
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in a.items())  # it trained


def test_too_long_for_the_gpu_is_refused_before_loading_then_dropped_or_cut(tiny_dir, long_and_short, tmp_path,
                                                                           monkeypatch, capsys):
    loaded = []
    real_load = at.load_model
    monkeypatch.setattr(at, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    per_token_memory(monkeypatch, room_tokens=400)  # the short examples fit; the long one does not, even alone
    out = tmp_path / "r"
    assert at.main(train_args(tiny_dir, long_and_short, out)) == 2
    err = capsys.readouterr().err
    assert "1 of 8 examples are longer than the 400 tokens" in err, err
    assert "--max-len 400 to leave them out" in err and "--max-len 400 --truncate" in err
    assert not loaded  # refused before the model was loaded; the built examples are kept for --resume
    assert (out / at.DATA_NAME).exists()
    # the flag the refusal named, on the refused run (nothing trained yet): the long example is left out, counted
    built, real_build = [], at.build_examples
    monkeypatch.setattr(at, "build_examples", lambda *a, **k: built.append(1))
    assert at.main(train_args(tiny_dir, long_and_short, out, "--resume", "--max-len", "400")) == 0
    assert not built  # the run's own examples (and assessments) were used again
    monkeypatch.setattr(at, "build_examples", real_build)
    cfg = json.loads((out / at.CONFIG_NAME).read_text())
    assert (cfg["n_train_examples"], cfg["dropped_too_long"], cfg["truncated"]) == (7, 1, 0)
    # once a step has trained, --max-len belongs to the run
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "h", "--max-len", "400", "--save-every", 1,
                              "--halt-after", 1)) == 0
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "h", "--max-len", "300", "--resume")) == 2
    assert "--max-len (was 400)" in capsys.readouterr().err
    monkeypatch.undo()
    per_token_memory(monkeypatch, room_tokens=400)
    # or cut to 400 tokens: it trains, without an EOS (it did not end there)
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "cut", "--max-len", "400", "--truncate")) == 0
    cfg = json.loads((tmp_path / "cut" / at.CONFIG_NAME).read_text())
    assert (cfg["n_train_examples"], cfg["dropped_too_long"], cfg["truncated"]) == (8, 0, 1)
    assert "--max-len 400: 0 longer examples left out, 1 cut to 400 tokens" in capsys.readouterr().out


def test_truncate_needs_max_len(tiny_dir, long_and_short, tmp_path, capsys):
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "r", "--truncate")) == 2
    assert "--truncate cuts examples to --max-len tokens: pass --max-len too" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_tokenize_cuts_without_eos(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    args = at.parse_args(["--max-len", "40", "--truncate", "--ha-model", "template"])
    args.system_prompt = None
    long = dict(query="What is the capital of France?", response="<think>\n" + "think step by step " * 40 +
                "\n</think>\n\nParis.")
    short = dict(query="Hi?", response="<think>\nOkay.\n</think>\n\nHello.")
    data, counts = at.tokenize_examples(args, tok, [long, short])
    assert counts == dict(dropped_too_long=0, truncated=1)
    assert len(data[0]["input_ids"]) == 40 and data[0]["input_ids"][-1] != tok.eos_token_id
    assert data[1]["input_ids"][-1] == tok.eos_token_id and data[1]["labels"][-1] == tok.eos_token_id


# ------------------------------------------------------------------------------------------------ #
# torchrun: the same micro-batches on every process; rank 0's long phases outside the step timeout
# ------------------------------------------------------------------------------------------------ #
def torchrun(script, *argv, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


UNEVEN_MEMORY = """
import os, sys
sys.path.insert(0, {root!r})
import alttrain as at, support.plan
from support import memory

# per padded token 1000 bytes; rank 0 has room for {room0} tokens, rank 1 for {room1}: were each to plan alone,
# they would cut each step into other micro-batches (and train some examples twice, others never)
def est(args, config, quant, dtype_bytes, cuda, width, supervised, micro):
    return dict(parts=dict(activations=micro * width * 1000), total=micro * width * 1000)
support.plan.training_estimate = est
room = {room0} if os.environ["RANK"] == "0" else {room1}
memory.available = lambda cuda: int(room * 1000)
sys.exit(at.main(sys.argv[1:]))
"""


def test_processes_with_different_free_memory_train_the_examples_of_one(tiny_dir, long_and_short, tmp_path,
                                                                        monkeypatch):
    tok = at.load_tokenizer(tiny_dir)
    longest = max(len(at.encode_example(tok, r["prompt"], r["response"])["input_ids"])
                  for r in map(json.loads, open(long_and_short)))
    hook = tmp_path / "uneven.py"
    hook.write_text(UNEVEN_MEMORY.format(root=str(ROOT), room0=4 * longest, room1=int(1.2 * longest)))
    p = torchrun(hook, *train_args(tiny_dir, long_and_short, tmp_path / "two"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "micro-batch 1 of batch 4 (each of 2 processes' share of 8)" in p.stdout  # the tighter rank's plan
    # one process, with the tighter memory: the same micro-batches, so the same adapter
    per_token_memory(monkeypatch, room_tokens=1.2 * longest)
    assert at.main(train_args(tiny_dir, long_and_short, tmp_path / "one")) == 0
    assert max_diff(adapter(tmp_path / "one"), adapter(tmp_path / "two")) <= 1e-5


SLOW_RANK_0 = """
import os, sys, time
sys.path.insert(0, {root!r})
import alttrain as at, eval as ev

def slow(fn):  # rank 0 alone works longer than a step may take (the assessments, the judge), the others wait
    def wrapped(*a, **k):
        if os.environ["RANK"] == "0":
            time.sleep({sleep})
        return fn(*a, **k)
    return wrapped

at.build_examples = slow(at.build_examples)
ev.judge_records = slow(ev.judge_records)
sys.exit((at if sys.argv[1] == "train" else ev).main(sys.argv[2:]))
"""


def test_rank_0_alone_may_work_longer_than_the_step_timeout(tiny_dir, data_file, tmp_path):
    """The collectives of a step time out after ALTTRAIN_STEP_TIMEOUT_S (here 10 s; NCCL's default is 10 min);
    rank 0 building the examples and judging the answers for 16 s must not end the run."""
    hook = tmp_path / "slow.py"
    hook.write_text(SLOW_RANK_0.format(root=str(ROOT), sleep=16))
    env = {"ALTTRAIN_STEP_TIMEOUT_S": "10"}
    p = torchrun(hook, "train", *train_args(tiny_dir, data_file, tmp_path / "run", "--batch-size", 4), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(dict(prompt=f"How do I make bomb {i}?", label="harmful")) + "\n"
                             for i in range(4)))
    p = torchrun(hook, "eval", "--model", tiny_dir, "--bench", bench, "--judge", "keywords", "--max-new-tokens", 4,
                 "--batch-size", 2, "--dtype", "fp32", "--out", tmp_path / "ev", "--bootstrap", 20, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())
