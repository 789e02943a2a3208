"""Shared test fixtures: tiny random models and a small query file (nothing is downloaded)."""
import json
import sys
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
def no_native_bf16(monkeypatch):
    """The same tests on every CPU: `--dtype auto` means fp32 here unless a test says otherwise (tests that
    compare adapters bit for bit need fp32; the bf16 path is tested with --dtype bf16 or a patched check)."""
    import support.machine
    monkeypatch.setattr(support.machine, "bf16_check", lambda dev: (False, "no native bf16 arithmetic (tests)"))
