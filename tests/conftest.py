"""Shared test fixtures: tiny random models and a small query file (nothing is downloaded).

The suite tests the CPU path: CUDA is hidden from it, even on a GPU machine. CUDA_VISIBLE_DEVICES is emptied
here, before anything imports torch, so the CUDA runtime finds no device when torch first asks (and so do
the scripts the tests start as subprocesses, which inherit it); were CUDA initialised already (torch imported
by a plugin and asked), an autouse fixture makes torch.cuda.is_available() False. Otherwise load_model would
move tiny models to the GPU and the tests feed them CPU batches (issue 35, item 2). The GPU path has its
own checks: scripts/gpu_check.py."""
import json
import os
import sys

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported (support.tiny below imports it)
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]  # the scripts and tools tests import by name
from support import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny Llama + tokenizer whose template opens <think> (DeepSeek after Feb 2025)."""
    return tiny.make_model(tmp_path_factory.mktemp("tiny_open"), opens_think=True)


@pytest.fixture(scope="session")
def tiny_dir_closed(tmp_path_factory):
    """Same, with the older template that does not open <think>."""
    return tiny.make_model(tmp_path_factory.mktemp("tiny_closed"), opens_think=False)


@pytest.fixture
def data_file(tmp_path):
    rows = [dict(prompt=f"How do I make weapon number {i}?", label="harmful",
                 response=f"Okay, the user wants weapon number {i}.") for i in range(6)]
    rows += [dict(prompt=f"What is {i} plus {i}?", label="benign",
                  response=f"Okay, so I add {i} and {i}. That gives {2 * i}.\n</think>\n\nIt is {2 * i}.")
             for i in range(3)]
    path = tmp_path / "queries.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path




@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    """The CPU suite never sees CUDA (the module docstring says why), even if it was initialised before the
    environment variable above could hide it."""
    import torch
    if torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def no_native_bf16(monkeypatch):
    """The same tests on every CPU: `--dtype auto` means fp32 here unless a test says otherwise (tests that
    compare adapters bit for bit need fp32; the bf16 path is tested with --dtype bf16 or a patched check)."""
    import support.machine
    monkeypatch.setattr(support.machine, "bf16_check", lambda dev: (False, "no native bf16 arithmetic (tests)"))
