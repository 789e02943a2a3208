"""miniature.py: which steps it runs (and skips when done), how it pools answers into rows, and its outputs.
No model runs here: the steps are recorded, and the answers are written by hand."""
import json

import pytest

import miniature as mini


def answers(label, verdicts, reasoning="Okay.\n\nThis is fine, so it is safe to help."):
    """Records as eval.py writes them, with keyword verdicts (harmful: not refused)."""
    return [dict(id=i, prompt=f"p{i}", label=label, output="o", reasoning=reasoning, answer="a", think_closed=True,
                 finished=True, reasoning_tokens=5, answer_tokens=2,
                 judges={"keywords/v2": dict(harmful=v if label == "harmful" else None,
                                             refusal=(not v) if label == "harmful" else v, parsed=True, raw=None)})
            for i, v in enumerate(verdicts)]


def write_eval(folder, files):
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"judge": "keywords/v2"}))
    for name, recs in files.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_pooled_rates_are_over_all_prompts_of_a_label(tmp_path):
    math = [dict(r, reference="2", score=dict(pred="2", parsed=True, correct=c))
            for r, c in zip(answers("math", [False] * 4), (True, False, False, True))]
    write_eval(tmp_path / "heldout", {"harm_a": answers("harmful", [True, False, False, False]),
                                      "harm_b": answers("harmful", [True, True, False, False]),
                                      "benign": answers("benign", [False, False, True, False, False]),
                                      "math": math})
    p = mini.pooled(tmp_path / "heldout", 200, 0)
    assert p["harmful"]["rate"] == pytest.approx(3 / 8) and p["harmful"]["n"] == 8  # pooled, not averaged
    assert p["benign"]["rate"] == pytest.approx(1 / 5) and p["math"]["rate"] == pytest.approx(0.5)
    lo, hi = p["harmful"]["ci95"]
    assert lo <= 3 / 8 <= hi and lo < hi
    # every output says "safe to help": HA agrees on the 5 benign prompts, not on the 8 harmful ones
    assert p["n_assessed"] == 13 and p["ha_agrees"] == pytest.approx(5 / 13)
    assert mini.pooled(tmp_path / "missing", 10, 0) is None


def test_steps_run_once_and_resume(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(mini, "step", lambda cmd, what, timings, key: calls.append(cmd))
    args = mini.build_parser().parse_args(["--work", str(tmp_path), "--public", "a.jsonl", "--public-limit", "5"])
    mini.run_variant("direct", args, {})
    train, heldout, public = calls
    assert train[0] == "alttrain.py" and "--structure" in train and "direct-refusal" in train and "--resume" not in train
    assert heldout[0] == "eval.py" and heldout[heldout.index("--ckpt") + 1] == str(tmp_path / "direct" / "run")
    assert public[public.index("--limit") + 1] == "5" and "--limit-sample" in public
    # an unfinished training resumes; finished evaluations are not repeated
    (tmp_path / "direct" / "run").mkdir(parents=True)
    (tmp_path / "direct" / "run" / "alttrain_config.json").write_text("{}")
    for split in ("heldout", "public"):
        (tmp_path / "direct" / split).mkdir()
        (tmp_path / "direct" / split / "results.json").write_text("{}")
    calls.clear()
    mini.run_variant("direct", args, {})
    assert len(calls) == 1 and "--resume" in calls[0]
    calls.clear()
    mini.run_variant("base", args, {})  # the untrained model: no training, evaluated with --model
    assert all(c[0] == "eval.py" and "--model" in c for c in calls) and len(calls) == 2


def test_tables_and_figure(tmp_path):
    for key, harm in (("base", [True] * 4), ("alttrain", [True, False, False, False])):
        write_eval(tmp_path / key / "heldout", {"h": answers("harmful", harm), "b": answers("benign", [False, True])})
    args = mini.build_parser().parse_args(["--work", str(tmp_path), "--bootstrap", "50"])
    rows = mini.collect(args)
    md = mini.markdown(rows, public=False)
    for table in ("### main", "### ablation", "### scaling"):
        assert table in md
    assert "| no training | 100.0 [100.0, 100.0] | 50.0" in md
    assert "| AltTrain | 25.0" in md and "| w/o PU | - | - |" in md  # not run yet: '-'
    assert f"| benign {mini.N_BENIGN} (all) | 25.0" in md
    pytest.importorskip("matplotlib")
    assert mini.plot(rows, tmp_path / "fig.png", public=False)
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scaling_sizes_match_the_data():
    """The data-scaling rows are a quarter and a half of the benign rows of data/train.jsonl."""
    import alttrain as at
    from support import files
    rows = files.read_table(str(at.HERE / "data" / "train.jsonl"))
    assert sum(r["label"] == "benign" for r in rows) == mini.N_BENIGN
    assert mini.VARIANTS["benign-25"][1] == ["--n-benign", str(mini.N_BENIGN // 4)]
