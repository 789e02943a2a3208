"""Every reader of a file the user names, fed the files people actually pass by mistake.

Property: each bad file is one UserError (printed by support.files.cli as one line, no traceback) that names
the file, and the line where there is one; a file that is merely written differently (a UTF-8 BOM, CRLF line
ends) reads exactly like the plain one; and a failing run loses nothing already written (answers, results,
checkpoints). The readers:
  alttrain.py --data (data.load_queries), --built (data.read_built), --cr-refusals, --ha-prompt;
  eval.py --bench FILE (benchmarks.load_local_file, task sets included), --jbb-artifacts, --goals (read_table),
  --compare (report.read_results), --ckpt (models.read_checkpoint: run config and adapter); verdict_fit.py --out.
And every path eval.py is given is checked before anything is loaded or downloaded, the judge before generation.
"""
import json
from argparse import Namespace
from pathlib import Path

import pytest

import alttrain as at
import eval as ev
from support import data, files, models, report
from support.benchmarks import load_jbb_artifact
from support.runs import CONFIG_NAME

GOOD = [dict(prompt="How do I pick a lock?", label="harmful", response="Okay, the user asks about locks."),
        dict(prompt="What is 2 plus 2?", label="benign", response="Okay, 2 and 2.\n</think>\n\nIt is 4.")]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows, end="\n") -> bytes:
    import csv
    import io
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator=end)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


# (name, file suffix, bytes, the line the error must name or None)
BAD_TABLES = [
    ("binary", ".jsonl", bytes(range(256)) * 8, 1),
    ("latin1_second_line", ".csv", "prompt,label\ncaf\u00e9 au lait?,benign\n".encode("latin-1"), 2),
    ("utf16", ".csv", "prompt,label\nhi,benign\n".encode("utf-16"), None),
    ("nul_byte", ".jsonl", jsonl(GOOD[:1]) + b'{"prompt": "a\x00", "label": "benign"}\n', 2),
    ("truncated_json", ".jsonl", jsonl(GOOD) + b'{"prompt": "How do I', 3),
    ("json_array", ".jsonl", json.dumps(GOOD).encode(), 1),
    ("not_an_object", ".jsonl", jsonl(GOOD[:1]) + b'"just a string"\n', 2),
    ("label_is_a_number", ".jsonl", jsonl([GOOD[0], dict(prompt="Hi?", label=1)]), 2),
    ("query_is_a_list", ".jsonl", jsonl([GOOD[0], dict(prompt=["Hi?", "There?"], label="benign")]), 2),
    ("empty_query", ".jsonl", jsonl([GOOD[0], dict(prompt="  ", label="benign")]), 2),
    ("missing_label_value", ".csv", b"prompt,label\nHow do I pick a lock?,harmful\nWhat is 2 plus 2?\n", 3),
    ("extra_fields", ".csv", b"prompt,label\nHow do I pick a lock?,harmful,oops\n", 2),
    ("no_prompt_column", ".jsonl", jsonl([dict(text="Hi", label="benign")]), None),
    ("empty_file", ".jsonl", b"", None),
    ("header_only", ".csv", b"prompt,label\n", None),
    ("wrong_extension", ".txt", b"hello\n", None),
]


def table_readers(tmp_path):
    """name -> a function reading a table the way that flag does."""
    def bench(path):  # eval.py --bench FILE
        args = ev.build_parser().parse_args(["--model", "x", "--bench", str(path)])
        args.no_prompt = {}
        return ev.load_benchmark(str(path), args)

    def goals(path):  # eval.py --goals (Crescendo): the table reader, then the goal column
        rows = files.read_table(str(path))
        return files.find_column(rows[0], ("goal", "prompt"), str(path), "goal")

    return {"alttrain --data": lambda p: data.load_queries(Namespace(data=str(p))),
            "eval --bench": bench, "eval --goals": goals}


def expect_clear_error(fn, path: Path, line):
    """One UserError, one line, naming the file (and the line, when the problem has one). Anything else
    (a traceback) fails the test."""
    with pytest.raises(files.UserError) as e:
        fn(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    if line is not None:
        assert f"{path}:{line}" in msg, msg
    return msg


@pytest.mark.parametrize("name,suffix,content,line", BAD_TABLES, ids=[c[0] for c in BAD_TABLES])
def test_bad_tables_are_one_clear_error(name, suffix, content, line, tmp_path):
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(content)
    for reader, fn in table_readers(tmp_path).items():
        if name in ("label_is_a_number", "missing_label_value") and reader == "eval --goals":
            continue  # goals have no label: these files are good goals
        if name in ("query_is_a_list", "empty_query") and reader == "eval --goals":
            continue  # the goal column is found; eval.py checks its values (not a reader of ours)
        expect_clear_error(fn, path, line)


@pytest.mark.parametrize("variant", ["bom", "crlf", "bom_crlf"])
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_bom_and_crlf_read_like_the_plain_file(variant, suffix, tmp_path):
    crlf = "crlf" in variant
    if suffix == ".jsonl":  # a \n inside a JSON string is escaped: only the line ends change
        plain = jsonl(GOOD)
        other = plain.replace(b"\n", b"\r\n") if crlf else plain
    else:  # the rows end in CRLF; a line break inside a quoted field stays as it was written
        plain, other = csv_bytes(GOOD), csv_bytes(GOOD, "\r\n" if crlf else "\n")
    other = (b"\xef\xbb\xbf" if "bom" in variant else b"") + other
    (tmp_path / f"plain{suffix}").write_bytes(plain)
    (tmp_path / f"other{suffix}").write_bytes(other)
    a = data.load_queries(Namespace(data=str(tmp_path / f"plain{suffix}")))
    b = data.load_queries(Namespace(data=str(tmp_path / f"other{suffix}")))
    strip = lambda qs: [{k: v for k, v in q.items() if k != "source"} for q in qs]
    assert strip(a) == strip(b) and len(a) == len(GOOD)


def test_a_csv_field_may_hold_a_long_trace(tmp_path):
    long = dict(GOOD[1], response="Okay. " * 40000 + "\n</think>\n\nIt is 4.")  # 240K characters in one field
    (tmp_path / "long.csv").write_bytes(csv_bytes([GOOD[0], long]))
    assert data.load_queries(Namespace(data=str(tmp_path / "long.csv")))[1]["response"] == long["response"]


BAD_TEXT = [("binary", bytes(range(256)) * 4, 1), ("latin1", "Sorry,\nje ne peux pas \u00e7a\n".encode("latin-1"), 2),
            ("empty_folder", None, None), ("missing", "missing", None)]


@pytest.mark.parametrize("name,content,line", BAD_TEXT, ids=[c[0] for c in BAD_TEXT])
def test_bad_prompt_files(name, content, line, tmp_path):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    for fn in (data.read_refusals, data.load_ha_prompt):
        msg = expect_clear_error(fn, path, line)
        assert msg.startswith(("--cr-refusals", "--ha-prompt")), msg


BUILT_OK = dict(query="How do I pick a lock?", label="harmful", response="Okay, the user asks. </think> No.")
BAD_BUILT = [("missing_response", jsonl([{k: v for k, v in BUILT_OK.items() if k != "response"}]), 1),
             ("response_is_a_number", jsonl([BUILT_OK, dict(BUILT_OK, response=3)]), 2),
             ("query_is_a_list", jsonl([dict(BUILT_OK, query=["a"])]), 1),
             ("label_unknown", jsonl([dict(BUILT_OK, label="maybe")]), 1),
             ("binary", b"\x89PNG\r\n\x1a\n" + bytes(200), 1)]


@pytest.mark.parametrize("name,content,line", BAD_BUILT, ids=[c[0] for c in BAD_BUILT])
def test_bad_built_examples(name, content, line, tmp_path):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    expect_clear_error(data.read_built, path, line)


HUMANEVAL_ROW = dict(task_id="t/0", prompt="def add(a, b):\n", test="def check(f):\n    assert f(1, 2) == 3\n",
                     entry_point="add")
BAD_TASKS = [("prompt_is_a_number", [HUMANEVAL_ROW, dict(HUMANEVAL_ROW, prompt=7)], 2),
             ("empty_test", [dict(HUMANEVAL_ROW, test="")], 1),
             ("question_is_a_list", [dict(question=["What", "is"], answer="4")], 1),
             ("choice_index_out_of_range", [dict(question="Pick", choices=["a", "b"], answer=5)], 1),
             ("empty_answer", [dict(question="What is 2+2?", answer="")], 1)]


@pytest.mark.parametrize("name,rows,line", BAD_TASKS, ids=[c[0] for c in BAD_TASKS])
def test_bad_task_files(name, rows, line, tmp_path):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(jsonl(rows))
    expect_clear_error(table_readers(tmp_path)["eval --bench"], path, line)


def good_results():
    return dict(base_model="m", ckpt=None, judge="keywords", heuristic=True,
                benchmarks={"xs": dict(label="benign", metric="refusal_rate", rate=0.25, n=4)}, general={},
                summary=dict(harmful_avg=None, over_refusal=0.25, reasoning_avg=None))


BAD_RESULTS = [("binary", bytes(range(256)) * 4, 1), ("truncated", json.dumps(good_results()).encode()[:60], 1),
               ("data_file_not_results", jsonl(GOOD), 2), ("a_list", b"[1, 2]", None),
               ("rate_is_text", json.dumps(dict(good_results(), benchmarks={"xs": dict(rate="25%")})).encode(), None),
               ("empty", b"", 1), ("utf16", json.dumps(good_results()).encode("utf-16"), None),
               ("interval_is_text", json.dumps(dict(good_results(), benchmarks={"xs": dict(rate=0.25, ci95="0-50")})).encode(), None),
               ("count_is_a_fraction", json.dumps(dict(good_results(), benchmarks={"xs": dict(rate=0.25, n=0.5)})).encode(), None)]


@pytest.mark.parametrize("name,content,line", BAD_RESULTS, ids=[c[0] for c in BAD_RESULTS])
def test_compare_refuses_what_is_not_results(name, content, line, tmp_path, capsys):
    good, bad = tmp_path / "good.json", tmp_path / f"{name}.json"
    good.write_text(json.dumps(good_results()))
    bad.write_bytes(content)
    msg = expect_clear_error(report.read_results, bad, line)
    assert msg.startswith("--compare")
    assert ev.main(["--compare", str(good), str(bad)]) == 2  # the command line: exit 2, one line on stderr
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error: --compare") and "Traceback" not in err


def test_compare_still_reads_real_results(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(good_results()))
    assert "| xs | refusal_rate | 4 | 25.0 | 25.0 | +0.0 |" in report.compare(str(path), str(path))


def test_jbb_artifact_files(tmp_path):
    args = Namespace(jbb_artifacts=str(tmp_path), jbb_artifact_model="vicuna-13b-v1.5", no_prompt={})
    path = tmp_path / "PAIR_vicuna-13b-v1.5.json"
    for content, line in ((bytes(range(256)), 1), (b'{"jailbreaks": [\n{"index": 1,', 2),
                          (json.dumps({"jailbreaks": [{"index": "one", "prompt": "x"}]}).encode(), None)):
        path.write_bytes(content)
        expect_clear_error(lambda p: load_jbb_artifact("jbb-pair", "PAIR/black_box", args), path, line)


@pytest.fixture
def run_folder(tmp_path):
    """A run folder as alttrain.py leaves it: run config, adapter config and a real safetensors adapter."""
    import torch
    from safetensors.torch import save_file
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps(dict(base_model="m", args={}, finished=True)))
    (folder / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", r=4)))
    save_file({"lora_A.weight": torch.zeros(4, 16), "lora_B.weight": torch.zeros(16, 4)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "config_not_json", "config_a_list",
                                    "adapter_config_binary"])
def test_a_broken_checkpoint_is_one_clear_error(damage, run_folder):
    assert models.read_checkpoint(str(run_folder), CONFIG_NAME)["base_model"] == "m"  # intact: reads
    adapter = run_folder / "adapter_model.safetensors"
    target = {"config_not_json": run_folder / CONFIG_NAME, "config_a_list": run_folder / CONFIG_NAME,
              "adapter_config_binary": run_folder / "adapter_config.json"}.get(damage, adapter)
    content = {"truncated": adapter.read_bytes()[:len(adapter.read_bytes()) // 2], "garbage": b"not tensors" * 20,
               "empty": b"", "config_not_json": b'{"base_model": "m", "args": {', "config_a_list": b"[]",
               "adapter_config_binary": bytes(range(256))}[damage]
    target.write_bytes(content)
    expect_clear_error(lambda p: models.read_checkpoint(str(run_folder), CONFIG_NAME), target, None)


def test_a_checkpoint_missing_a_file_is_one_clear_error(run_folder):
    (run_folder / "adapter_model.safetensors").unlink()  # a run that never finished
    with pytest.raises(files.UserError, match="no adapter .*alttrain.py --resume"):
        models.read_checkpoint(str(run_folder), CONFIG_NAME)
    (run_folder / CONFIG_NAME).unlink()  # not a run folder at all
    with pytest.raises(files.UserError, match=f"no {CONFIG_NAME}; is this an output folder of alttrain.py"):
        models.read_checkpoint(str(run_folder), CONFIG_NAME)


# ------------------------------------------------------------------------------------------------ #
# Through the command lines: one line on stderr, exit code 2, and nothing already written is lost
# ------------------------------------------------------------------------------------------------ #
def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


BINARY = bytes(range(256)) * 8


def test_eval_with_a_binary_bench_file_keeps_earlier_answers(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "xs.jsonl").write_text(json.dumps(dict(id=0, prompt="p", output="an answer")) + "\n")
    (out / "results.json").write_text(json.dumps(good_results()))
    before = snapshot(out)
    bad = tmp_path / "xs.jsonl"
    bad.write_bytes(BINARY)
    assert ev.main(["--model", str(tiny_dir), "--bench", str(bad), "--judge", "keywords", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{bad}:1: not UTF-8 text" in err and "Traceback" not in err
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", ["--data", "--built"])
def test_alttrain_with_a_binary_data_file_keeps_the_run(flag, tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()  # an unfinished run: its checkpoint must survive a bad command
    (out / CONFIG_NAME).write_text(json.dumps(dict(base_model=str(tiny_dir), args={}, finished=False)))
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "adapter_model.safetensors").write_bytes(b"weights")
    before = snapshot(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BINARY)
    for target in (out, tmp_path / "fresh"):  # the existing run (refused), and a new folder (the file is read)
        assert at.main(["--model", str(tiny_dir), flag, str(bad), "--ha-model", "template", "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("alttrain.py: error:") and "Traceback" not in err
        if target != out:
            assert f"{bad}:1: not UTF-8 text" in err
    assert snapshot(out) == before


# ------------------------------------------------------------------------------------------------ #
# Fail fast on what the user named: before any benchmark, model or judge is loaded or downloaded
# ------------------------------------------------------------------------------------------------ #
@pytest.fixture
def nothing_loads(monkeypatch):
    """Every loader eval.py reaches after its checks (Hub benchmarks, local files, models, judges) fails the
    test if called: the error must come first."""
    def loaded(*a, **k):
        raise AssertionError("loaded before the named inputs were checked")
    for name in ("hub_dataset", "load_benchmark", "load_policy", "load_judge", "load_tokenizer", "load_model",
                 "resolve_model"):
        monkeypatch.setattr(ev, name, loaded)


@pytest.mark.parametrize("case", ["ckpt_missing", "ckpt_without_config", "ckpt_without_adapter", "bench_missing",
                                  "bench_a_folder", "bench_unknown_name", "model_folder_missing", "goals_missing"])
def test_eval_checks_what_the_user_named_before_loading_anything(case, run_folder, tmp_path, capsys, nothing_loads):
    """`eval.py --ckpt out/` with no out/ used to retry the Hub for StrongREJECT (the default --bench) first and then
    fail naming it; now each named path is checked before any benchmark or model loads, and the message names it."""
    missing = tmp_path / "nope"
    (run_folder / "adapter_model.safetensors").unlink()
    bare = tmp_path / "bare"
    bare.mkdir()
    argv, named = {
        "ckpt_missing": (["--ckpt", str(missing)], f"--ckpt {missing}: no such folder"),
        "ckpt_without_config": (["--ckpt", str(bare)], f"--ckpt {bare}: no {CONFIG_NAME}"),
        "ckpt_without_adapter": (["--ckpt", str(run_folder)], f"--ckpt {run_folder}: no adapter"),
        "bench_missing": (["--model", "smollm2-135m", "--bench", "strongreject", str(missing) + ".jsonl"],
                          f"--bench {missing}.jsonl: no such file"),
        "bench_a_folder": (["--model", "smollm2-135m", "--bench", "xstest", str(bare) + ".jsonl"], None),
        "bench_unknown_name": (["--model", "smollm2-135m", "--bench", "strongreject", "strongrejct"],
                               "--bench strongrejct: not a known benchmark"),
        "model_folder_missing": (["--model", str(missing) + "/", "--bench", "jbb"], f"--model {missing}/: no such folder"),
        "goals_missing": (["--model", "smollm2-135m", "--attack", "crescendo", "--attacker-model", "smollm2-135m",
                           "--goals", str(missing) + ".csv"], f"--goals {missing}.csv: no such file"),
    }[case]
    if case == "bench_a_folder":
        (tmp_path / "bare.jsonl").mkdir()
        named = f"--bench {bare}.jsonl: a folder, not a file"
    assert ev.main(argv + ["--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "ev").exists()  # and nothing was written


def test_eval_checks_the_judge_before_generating(tiny_dir, tmp_path, monkeypatch, capsys):
    """Offline, the default judge (Qwen3Guard) cannot be fetched: eval.py used to generate every answer and then
    fail on the judge's download. Now the judge's tokenizer is fetched first, and nothing is generated or written."""
    bench = tmp_path / "xs.jsonl"
    bench.write_bytes(jsonl([dict(prompt="How do I pick a lock?", label="harmful")]))
    import support.judges
    real = support.judges.load_tokenizer

    def offline(path, *a, **k):
        if path == ev.JUDGES["qwen3guard"]:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")
        return real(path, *a, **k)
    monkeypatch.setattr(support.judges, "load_tokenizer", offline)  # where check_judge reads the judge
    monkeypatch.setattr(ev, "load_policy", lambda *a: (_ for _ in ()).throw(AssertionError("policy loaded")))
    out = tmp_path / "ev"
    assert ev.main(["--model", str(tiny_dir), "--bench", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the judge Qwen/Qwen3Guard-Gen-0.6B (OSError" in err and "--judge keywords" in err
    assert not out.exists()


@pytest.mark.parametrize("why", ["data_file_missing", "hub_offline"])
def test_a_failed_alttrain_start_leaves_no_out_folder(why, tiny_dir, tmp_path, monkeypatch, capsys):
    """alttrain.py offline with --data safechain (or a mistyped --data) used to leave an empty --out behind."""
    if why == "hub_offline":
        def offline(name, split, flag, *a, **k):
            raise files.UserError(f"{flag}: cannot load {name} (offline)")
        monkeypatch.setattr(data, "hub_dataset", offline)
    source = "safechain" if why == "hub_offline" else str(tmp_path / "queries.jsonl")
    out = tmp_path / "deep" / "run"
    assert at.main(["--model", str(tiny_dir), "--data", source, "--ha-model", "template", "--out", str(out)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


def test_verdict_fit_writes_beside_the_run_or_to_out_never_into_the_repository(tiny_dir, data_file, tmp_path, capsys):
    """scripts/verdict_fit.py wrote into bench/results/verdict_fit.json, a tracked file, with no --out. Now: the run's
    folder by default, --out FILE to gather runs; a damaged --out or a folder that is no run is one error."""
    import verdict_fit
    tracked = Path(verdict_fit.__file__).resolve().parent.parent / "bench" / "results" / "verdict_fit.json"
    before = tracked.read_bytes() if tracked.exists() else None
    run = tmp_path / "run"
    assert at.main(["--model", str(tiny_dir), "--data", str(data_file), "--ha-model", "template", "--epochs", "1",
                    "--batch-size", "4", "--out", str(run)]) == 0
    assert verdict_fit.main([str(run), "--own-pu", "0"]) == 0
    entry = json.loads((run / "verdict_fit.json").read_text())
    assert list(entry) == [str(run)] and set(entry[str(run)]["result"]) == {"harmful", "benign"}
    gathered = tmp_path / "all" / "verdicts.json"
    gathered.parent.mkdir()
    gathered.write_text(json.dumps({"earlier/run": {"result": {}}}))
    assert verdict_fit.main([str(run), "--own-pu", "0", "--out", str(gathered)]) == 0
    assert set(json.loads(gathered.read_text())) == {"earlier/run", str(run)}  # added to, nothing lost
    assert (tracked.read_bytes() if tracked.exists() else None) == before
    capsys.readouterr()
    gathered.write_bytes(b'{"earlier/run": {')  # damaged: refused, left as it was
    assert verdict_fit.main([str(run), "--own-pu", "0", "--out", str(gathered)]) == 2
    assert gathered.read_bytes() == b'{"earlier/run": {'
    assert verdict_fit.main([str(tmp_path / "all"), "--own-pu", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"verdict_fit.py: error: --out {gathered}:1: not valid JSON")
    assert err[1] == f"verdict_fit.py: error: {tmp_path / 'all'}: no alttrain_config.json; is this an output folder of alttrain.py?"
