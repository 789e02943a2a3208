"""Tests for alttrain.py, on CPU with tiny random models built here (nothing is downloaded).

Run: python -m pytest -q
"""
import json
import re
from pathlib import Path

import pytest
import torch

import alttrain as at
from support import chat, data, files, sentences

HARMFUL_TRACE = "Okay, so the user is asking how to make a bomb. First I need the materials, e.g. a pipe."
BENIGN_RESPONSE = ("Okay, the user wants the capital of France. It is Paris, a city of 2.1 million people.\n"
                   "</think>\n\nThe capital of France is Paris.")


def run_cli(*argv):
    return at.main([str(a) for a in argv])


def small_run(model, data, out, *extra):
    return run_cli("--model", model, "--data", data, "--ha-model", "template", "--epochs", 2, "--batch-size", 4,
                   "--micro-batch-size", 2, "--lr", 5e-3, "--warmup-steps", 1, "--out", out, *extra)


# ------------------------------------------------------------------------------------------------ #
# Building the examples (PU -> HA -> CR)
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("text,first", [
    ("Okay, so the user wants X. Then more.", "Okay, so the user wants X."),
    ("Hmm, e.g. this is one sentence. Two.", "Hmm, e.g. this is one sentence."),
    ("It costs 3.5 dollars! Next.", "It costs 3.5 dollars!"),
    ("No end mark here\nsecond line", "No end mark here"),
    ('He said "stop." Then left.', 'He said "stop."'),
])
def test_first_sentence(text, first):
    assert at.first_sentence(text)[0] == first


def test_split_response_safechain_style():
    reasoning, answer = at.split_response(BENIGN_RESPONSE)
    assert reasoning.startswith("Okay, the user wants") and answer == "The capital of France is Paris."
    assert at.split_response("<think>\nabc\n</think>\nxyz") == ("abc", "xyz")
    assert at.split_response("only a trace opening.") == ("only a trace opening.", "")


def test_harmful_example_parts():
    ex = at.build_example("How do I make a bomb?", "harmful", HARMFUL_TRACE, "", "HA sentence.", "alt")
    assert ex["pu"] == "Okay, so the user is asking how to make a bomb."
    assert ex["ha"] == "HA sentence."
    assert ex["cr"] in at.read_lines(at.PROMPTS / "cr_refusal.txt")
    assert ex["answer"] in at.read_lines(at.PROMPTS / "refusal_answer.txt")
    assert "materials" not in ex["response"]  # the solving part of the original trace is gone
    think = ex["response"].split("</think>")[0]
    assert think.index(ex["pu"]) < think.index(ex["ha"]) < think.index(ex["cr"])
    assert ex["response"].count("<think>") == 1 and ex["response"].endswith(ex["answer"])


def test_benign_example_keeps_rest_of_trace_and_answer():
    reasoning, answer = at.split_response(BENIGN_RESPONSE)
    ex = at.build_example("Capital of France?", "benign", reasoning, answer, "Safe to help.", "alt")
    assert ex["pu"] == "Okay, the user wants the capital of France."
    assert ex["cr"] == "It is Paris, a city of 2.1 million people."
    assert ex["answer"] == "The capital of France is Paris."
    assert ex["response"] == ("<think>\nOkay, the user wants the capital of France.\n\nSafe to help.\n\n"
                              "It is Paris, a city of 2.1 million people.\n</think>\n\nThe capital of France is Paris.")


@pytest.mark.parametrize("structure,present,absent", [
    ("no-pu", ("ha", "cr"), ("pu",)), ("no-ha", ("pu", "cr"), ("ha",)), ("no-cr", ("pu", "ha"), ("cr",)),
])
def test_ablation_structures(structure, present, absent):
    reasoning, answer = at.split_response(BENIGN_RESPONSE)
    full = at.build_example("Capital of France?", "benign", reasoning, answer, "Safe to help.", "alt")
    for label, trace, ans in (("harmful", HARMFUL_TRACE, ""), ("benign", reasoning, answer)):
        ex = at.build_example("Capital of France?", label, trace, ans, "The HA.", structure)
        think = ex["response"].split("</think>")[0]
        for part in present:
            assert ex[part] and ex[part] in think
        for part in absent:
            assert ex[part] == ""
        assert ex["answer"] and ex["response"].endswith(ex["answer"])
    assert full["cr"] in full["response"]


def test_direct_refusal_baseline():
    ex = at.build_example("How do I make a bomb?", "harmful", HARMFUL_TRACE, "", "HA.", "direct-refusal")
    assert ex["response"].startswith("<think>\n\n</think>\n\n") and ex["pu"] == ex["ha"] == ex["cr"] == ""
    reasoning, answer = at.split_response(BENIGN_RESPONSE)
    ex = at.build_example("Capital?", "benign", reasoning, answer, "HA.", "direct-refusal")
    assert "It is Paris" in ex["response"] and ex["ha"] == ""


SAFE_HARMFUL_RESPONSE = ("<think>\nThe user asks how to make a bomb. That could kill people, and the policy forbids "
                         "helping with weapons.\n</think>\n\nI can't help with making explosives.")


def test_original_structure_keeps_the_reference_response():
    """--structure original (SafeChain's baseline, plain safety SFT): the reference trace and answer as they
    are, for harmful and benign queries alike - no HA, no refusal template."""
    for label, response in (("harmful", SAFE_HARMFUL_RESPONSE), ("benign", BENIGN_RESPONSE)):
        reasoning, answer = at.split_response(response)
        ex = at.build_example("q?", label, reasoning, answer, "The HA.", "original")
        assert ex["response"] == f"<think>\n{reasoning}\n</think>\n\n{answer}"
        assert ex["ha"] == "" and "The HA." not in ex["response"]
    assert "policy forbids" in at.build_example("q?", "harmful", *at.split_response(SAFE_HARMFUL_RESPONSE),
                                               "", "original")["response"]


def test_original_structure_needs_whole_references(tmp_path):
    """A harmful row of data/train.jsonl keeps only its first sentence: 'original' has nothing to train on
    there and says so, naming the row, before any model is loaded."""
    args = at.parse_args(["--data", str(at.HERE / "data" / "train.jsonl"), "--structure", "original",
                          "--ha-model", "template"])
    queries = at.load_queries(args)
    with pytest.raises(at.UserError, match=r"whole reference response.*train.jsonl:\d+"):
        at.build_examples(args, queries)
    benign = [q for q in queries if q["label"] == "benign"]
    examples, stats = at.build_examples(args, benign)
    assert all(e["structure"] == "original" and e["ha"] == "" for e in examples)
    assert stats["ha_template"] == 0 and stats["ha_given"] == 0  # no HA is written for a structure without one


def test_cr_refusals_file(tmp_path):
    f = tmp_path / "refusals.txt"
    f.write_text("# comment\nI will stop here, first wording.\nI will stop here, second wording.\n")
    rows = [dict(prompt=f"How do I hurt person {i}?", label="harmful", response=HARMFUL_TRACE) for i in range(12)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = at.parse_args(["--data", str(data), "--ha-model", "template", "--cr-refusals", str(f)])
    examples, _ = at.build_examples(args, at.load_queries(args))
    wordings = {e["cr"] for e in examples}
    assert wordings == {"I will stop here, first wording.", "I will stop here, second wording."}
    assert len(at.read_lines(at.PROMPTS / "cr_refusal_varied.txt")) >= 20  # the 'CR rephrased' ablation's file
    for bad, msg in ((tmp_path / "none.txt", "no such file"), (tmp_path / "empty.txt", "no refusal lines")):
        if "empty" in bad.name:
            bad.write_text("# only a comment\n")
        args = at.parse_args(["--data", str(data), "--ha-model", "template", "--cr-refusals", str(bad)])
        with pytest.raises(at.UserError, match=msg):
            at.build_examples(args, at.load_queries(args))


def test_recipes_fill_only_unset_flags():
    a = at.parse_args([])
    assert (a.n_harmful, a.n_benign, a.structure) == (900, 100, "alt")
    s = at.parse_args(["--data", "star1"])
    assert (s.n_harmful, s.n_benign, s.structure) == (None, None, "original")  # STAR-1's 1K, as released
    s = at.parse_args(["--data", "star1", "--n-harmful", "10", "--structure", "alt"])
    assert (s.n_harmful, s.structure) == (10, "alt")
    assert at.parse_args(["--data", "x.jsonl", "--n-benign", "all"]).n_benign is None


def test_star1_from_a_local_file_of_its_schema(tmp_path, monkeypatch):
    """--data star1 reads UCSC-VLAA/STAR-1 (question, response with <think>, category, source, score); here
    the Hub is replaced by a local file of the same columns."""
    rows = [dict(id=str(i), question=f"How can I hack account {i}?", response=SAFE_HARMFUL_RESPONSE,
                 category="Privacy", source="test", score={"overall": 10}) for i in range(3)]
    f = tmp_path / "star1.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from datasets import load_dataset
    monkeypatch.setattr(data, "hub_dataset", lambda name, split, flag: load_dataset("json", data_files=str(f), split="train"))
    args = at.parse_args(["--data", "star1"])
    queries = at.select_queries(at.load_queries(args), args.n_harmful, args.n_benign, args.seed)
    assert len(queries) == 3 and all(q["label"] == "harmful" for q in queries)
    examples, _ = at.build_examples(args, queries)
    reasoning, answer = at.split_response(SAFE_HARMFUL_RESPONSE)
    assert all(e["response"] == f"<think>\n{reasoning}\n</think>\n\n{answer}" for e in examples)
    monkeypatch.setattr(data, "hub_dataset", lambda *a: [dict(question="q", response="")])
    with pytest.raises(at.UserError, match="row 0: empty or missing 'response'"):
        at.load_queries(args)


def test_templates_agree_with_their_label():
    for label in ("harmful", "benign"):
        for line in at.read_lines(at.PROMPTS / f"ha_{label}.txt"):
            assert at.ha_verdict(line) == label, line


@pytest.mark.parametrize("sentence,verdict", [
    ("This request is harmful because it could hurt people, so I should not help.", "harmful"),
    ("This is not harmful at all, it is a legitimate cooking question, so I can help.", "benign"),
    ("The weather is nice today.", "unclear"),
    ("It is safe but also dangerous.", "unclear"),
    # the stated decision settles it, whatever words came before
    ("This is about ending computer processes, not hurting anyone, so it is safe to help.", "benign"),
    ("But wait, this sounds harmless, yet it is a plan to poison a dog, so I should not help with it.", "harmful"),
    ("It could be harmful, but here it is a game, so I can help.", "benign"),
])
def test_ha_verdict(sentence, verdict):
    assert at.ha_verdict(sentence) == verdict


def test_build_with_llm_ha_and_self_traces(tiny_dir, tmp_path):
    """A random model writes nonsense: every assessment is rejected and replaced by a template (and
    counted); the query without a trace gets a self-trace."""
    tok, model = at.load_tokenizer(tiny_dir), at.load_model(tiny_dir, quant=False)
    args = at.parse_args(["--self-trace-tokens", "8", "--gen-batch-size", "2"])
    queries = [dict(query="How do I make a bomb?", label="harmful", response=HARMFUL_TRACE, source="a"),
               dict(query="What is two plus two?", label="benign", response=BENIGN_RESPONSE, source="b"),
               dict(query="Tell me about Paris.", label="benign", response=None, source="c")]
    examples, stats = at.build_examples(args, queries, model, tok, model, tok)
    assert stats["self_traces"] == 1 and examples[2]["self_trace"] and not examples[0]["self_trace"]
    assert stats["ha_llm"] + stats["ha_template"] == 3 and stats["ha_rejected"] == stats["ha_template"]
    for ex in examples:
        assert ex["ha"] in at.read_lines(at.PROMPTS / f"ha_{ex['label']}.txt") or \
            at.ha_verdict(ex["ha"]) == ex["label"]


def test_assessments_from_the_data_are_used_when_they_agree(tmp_path):
    """An `ha` column is HA as-is when it agrees with the label; one that contradicts it is rejected
    (counted) and replaced, here by a template (no model loaded)."""
    rows = [dict(prompt="How do I kill a stuck process?", label="benign", response=BENIGN_RESPONSE,
                 ha="This is about stopping a program, so it is safe to help."),
            dict(prompt="How do I make a bomb?", label="harmful", response=HARMFUL_TRACE,
                 ha="This is a fun chemistry question, so it is safe to help."),       # contradicts the label
            dict(prompt="How do I pick a lock?", label="harmful", response=HARMFUL_TRACE)]  # none given
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = at.parse_args(["--data", str(f), "--ha-model", "template"])
    queries = at.load_queries(args)
    examples, stats = at.build_examples(args, queries)
    assert (stats["ha_given"], stats["ha_rejected"], stats["ha_template"]) == (1, 1, 2)
    assert examples[0]["ha"] == rows[0]["ha"] and examples[0]["ha"] in examples[0]["response"]
    for ex in examples[1:]:
        assert ex["ha"] in at.read_lines(at.PROMPTS / "ha_harmful.txt")


def test_all_queries_of_a_label():
    qs = [dict(query=f"q{i}", label="harmful" if i % 3 else "benign", response="r.", source="") for i in range(30)]
    args = at.build_parser().parse_args(["--n-harmful", "all", "--n-benign", "3"])
    chosen = at.select_queries(qs, args.n_harmful, args.n_benign, seed=1)
    assert sum(q["label"] == "harmful" for q in chosen) == 20 and sum(q["label"] == "benign" for q in chosen) == 3
    for bad in ("-1", "many"):
        with pytest.raises(SystemExit):
            at.build_parser().parse_args(["--n-benign", bad])


def test_selection_is_deterministic_and_balanced():
    qs = [dict(query=f"q{i}", label="harmful" if i % 3 else "benign", response="r.", source="") for i in range(60)]
    a = at.select_queries(qs, 10, 5, seed=1995)
    assert a == at.select_queries(qs, 10, 5, seed=1995) and a != at.select_queries(qs, 10, 5, seed=1)
    assert sum(q["label"] == "harmful" for q in a) == 10 and sum(q["label"] == "benign" for q in a) == 5


def test_safechain_labels():
    assert data.normalise_label("vanilla_harmful", "x") == "harmful"
    assert data.normalise_label("adversarial_benign", "x") == "benign"


# ------------------------------------------------------------------------------------------------ #
# Tokenisation traps
# ------------------------------------------------------------------------------------------------ #
@pytest.mark.parametrize("which", ["tiny_dir", "tiny_dir_closed"])
def test_one_think_one_bos_nothing_stripped(which, request):
    tok = at.load_tokenizer(request.getfixturevalue(which))
    ex = at.build_example("How do I make a bomb?", "harmful", HARMFUL_TRACE, "", "Wait, harmful.", "alt")
    enc = at.encode_example(tok, ex["query"], ex["response"])
    text = tok.decode(enc["input_ids"])
    assert text.count("<think>") == 1                      # whether or not the template opened it
    assert enc["input_ids"].count(tok.bos_token_id) == 1 and enc["input_ids"][0] == tok.bos_token_id
    assert ex["pu"] in text and "Wait, harmful." in text     # text before </think> survives
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["labels"][-1] == tok.eos_token_id


def test_template_would_strip_reasoning(tiny_dir):
    """The reason we never render the assistant turn with the template: it deletes the <think> part."""
    tok = at.load_tokenizer(tiny_dir)
    rendered = tok.apply_chat_template([{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "<think>\nPU here\n</think>\n\nA"}],
                                       tokenize=False)
    assert "PU here" not in rendered


def test_labels_mask_prompt_only(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    enc = at.encode_example(tok, "What is 2+2?", "<think>\nsum\n</think>\n\n4")
    n_prompt = len(at.encode_prompt(tok, at.render_prompt(tok, "What is 2+2?")))
    assert enc["labels"][:n_prompt] == [-100] * n_prompt
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tok.decode(enc["input_ids"][n_prompt:]).startswith("sum")  # '<think>\n' came from the template


def test_system_prompt_only_when_asked(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    assert "Be safe" not in at.render_prompt(tok, "q")
    assert "Be safe" in at.render_prompt(tok, "q", "Be safe")


def test_pad_equal_to_eos_keeps_eos_supervised(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    assert tok.pad_token_id == tok.eos_token_id  # the trap is live in this tokenizer
    a = at.encode_example(tok, "short", "<think>\nx\n</think>\n\ny")
    b = at.encode_example(tok, "a much longer question here", "<think>\nlonger reasoning here\n</think>\n\nyes")
    batch = at.collate([a, b], tok.pad_token_id)
    n = len(a["input_ids"])
    assert batch["labels"][0, n - 1] == tok.eos_token_id       # real EOS kept
    assert (batch["labels"][0, n:] == -100).all()                # padding ignored
    assert batch["attention_mask"][0].sum() == n and batch["attention_mask"][1].all()


def test_ha_weight_marks_exactly_the_assessment_tokens(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    ha = "But wait, a bomb could kill people, so I should not help with it."
    ex = at.build_example("How do I make a bomb?", "harmful", HARMFUL_TRACE, "", ha, "alt")
    plain = at.encode_example(tok, ex["query"], ex["response"], ha=ex["ha"])
    assert "weights" not in plain                                  # weight 1: plain SFT, nothing added
    enc = at.encode_example(tok, ex["query"], ex["response"], ha=ex["ha"], ha_weight=4.0)
    assert enc["input_ids"] == plain["input_ids"] and enc["labels"] == plain["labels"]  # same tokens
    w = enc["weights"]
    assert len(w) == len(enc["input_ids"])
    assert all(x == 0 for x, lab in zip(w, enc["labels"]) if lab == -100)  # the prompt weighs nothing
    heavy = [i for i, x in enumerate(w) if x == 4.0]
    assert heavy == list(range(heavy[0], heavy[-1] + 1))              # one contiguous span ...
    assert tok.decode(enc["input_ids"][heavy[0]:heavy[-1] + 1]).strip() == ha  # ... that is the sentence
    assert w[-1] == 1.0 and enc["labels"][-1] == tok.eos_token_id       # EOS still learned, weight 1
    with pytest.raises(ValueError, match="not in the response"):
        at.encode_example(tok, ex["query"], ex["response"], ha="another sentence", ha_weight=4.0)


def test_ha_weight_loss_is_a_weighted_mean(tiny_dir):
    """Weighted tokens count `w` times in the sum and in the normaliser; weight 1 is the plain loss."""
    tok = at.load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    model, _ = lora_model(tiny_dir, quant=False, grad_ckpt=False)
    exs = [at.build_example(f"question {i}", "benign", f"Okay, question {i}. The answer is {i}.", f"it is {i}",
                            f"This is about the number {i}, so it is safe to help.", "alt") for i in range(3)]
    def batch(w):
        return at.collate([at.encode_example(tok, e["query"], e["response"], ha=e["ha"], ha_weight=w)
                           for e in exs], tok.pad_token_id)
    plain, ones, heavy = batch(1.0), batch(1.0 + 1e-9), batch(3.0)
    n_sup = int((plain["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        base = at.response_loss_sum(model, plain) / n_sup
        assert at.loss_normaliser([plain]) == n_sup
        assert torch.allclose(at.response_loss_sum(model, ones) / at.loss_normaliser([ones]), base)
        # by hand: cross-entropy per token, weighted
        hidden = model.get_base_model().get_decoder()(input_ids=heavy["input_ids"],
                                                      attention_mask=heavy["attention_mask"]).last_hidden_state
        logits = model.get_base_model().get_output_embeddings()(hidden[:, :-1]).float()
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), heavy["labels"][:, 1:], reduction="none",
                                               ignore_index=-100)
        w = heavy["weights"][:, 1:]
        expect = (ce * w).sum() / w.sum()
        n_ha = int((w == 3.0).sum())
        assert n_ha > 0 and at.loss_normaliser([heavy]) == pytest.approx(n_sup + 2 * n_ha)
        assert torch.allclose(at.response_loss_sum(model, heavy) / at.loss_normaliser([heavy]), expect, atol=1e-5)


def test_ha_weight_flag_checked(tiny_dir, tmp_path):
    with pytest.raises(at.UserError, match="--ha-weight"):
        at.run(at.parse_args(["--model", str(tiny_dir), "--data", str(Path(__file__).resolve().parent.parent / "data" / "train.jsonl"), "--ha-weight", "0",
                              "--out", str(tmp_path / "o")]))


def test_verdict_fit_checks_the_token_that_opens_the_assessment(tiny_dir, monkeypatch):
    """scripts/verdict_fit.py: a model that always predicts the harmful opener's first token gets every harmful
    verdict right and every benign one wrong, whatever comes before."""
    import sys
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import verdict_fit
    tok = at.load_tokenizer(tiny_dir)
    exs = [at.build_example(f"q{i}", label, "Okay, the user asks something.", "fine",
                            "But wait, no, so I should not help with it." if label == "harmful"
                            else "This is fine, so it is safe to help.", "alt")
           for i, label in enumerate(["harmful", "benign", "harmful"])]
    exs.append(at.build_example("q", "benign", "Okay.", "x", "", "no-ha"))  # no HA: not counted
    def first_ha_token(ex):
        enc = at.encode_example(tok, ex["query"], ex["response"], ha=ex["ha"], ha_weight=2.0)
        return enc["input_ids"][enc["weights"].index(2.0)]
    target = first_ha_token(exs[0])
    assert target == first_ha_token(exs[2]) != first_ha_token(exs[1])

    class AlwaysBut(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], len(tok))
            logits[..., target] = 1.0
            return type("Out", (), {"logits": logits})
    hits = verdict_fit.verdict_hits(AlwaysBut(), tok, exs)
    assert hits == {"harmful": [True, True], "benign": [False]}


def test_length_grouping_covers_all_and_reduces_padding():
    lengths = [10 + (i * 37) % 500 for i in range(200)]
    batches = at.length_grouped_batches(lengths, 8, seed=0)
    assert sorted(i for b in batches for i in b) == list(range(200))
    padded = lambda bs: sum(len(b) * max(lengths[i] for i in b) for b in bs)
    plain = [list(range(k, min(k + 8, 200))) for k in range(0, 200, 8)]
    assert padded(batches) < 0.8 * padded(plain)
    assert at.length_grouped_batches(lengths, 8, seed=1) != batches  # the order is still random
    mixed = at.random_batches(lengths, 8, seed=0)
    assert sorted(i for b in mixed for i in b) == list(range(200)) and padded(batches) < 0.8 * padded(mixed)


# ------------------------------------------------------------------------------------------------ #
# Training
# ------------------------------------------------------------------------------------------------ #
def lora_model(path, quant, grad_ckpt=True, r=8):
    args = at.build_parser().parse_args(["--lora-r", str(r), "--lora-alpha", str(2 * r)] +
                                        ([] if grad_ckpt else ["--no-grad-ckpt"]))
    return at.add_lora(at.load_model(path, quant=quant), args, quant), args


def fixed_batch(tok):
    exs = [at.encode_example(tok, f"question {i}", f"<think>\nthe answer is {i}\n</think>\n\nit is {i}")
           for i in range(4)]
    return at.collate(exs, tok.pad_token_id)


@pytest.mark.parametrize("quant", [False, True], ids=["plain-lora", "4bit-qlora"])
def test_few_steps_lower_the_loss(tiny_dir, quant):
    tok = at.load_tokenizer(tiny_dir)
    torch.manual_seed(0)
    model, args = lora_model(tiny_dir, quant)
    args.lr, args.optim = 1e-2, "adamw8bit"
    opt = at.make_optimizer(model, args)
    batch = fixed_batch(tok)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    losses = []
    for _ in range(8):
        loss = at.response_loss_sum(model, batch) / n_sup
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


def test_gradient_checkpointing_gives_lora_grads(tiny_dir):
    tok = at.load_tokenizer(tiny_dir)
    model, _ = lora_model(tiny_dir, quant=False, grad_ckpt=True)
    base = model.base_model.model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing  # 5.25's new name
    at.response_loss_sum(model, fixed_batch(tok)).backward()
    lora = {n: p.grad for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(g is not None for g in lora.values())
    # B starts at zero, so A's first gradient is zero by construction; B's must not be
    assert all(g.abs().sum() > 0 for n, g in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_accumulation_matches_one_big_batch(tiny_dir):
    """Per-token normalisation across micro-batches: 2 x 2 accumulated == one batch of 4."""
    tok = at.load_tokenizer(tiny_dir)
    batch = fixed_batch(tok)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    grads = []
    for split in ([slice(0, 4)], [slice(0, 2), slice(2, 4)]):
        torch.manual_seed(0)
        model, _ = lora_model(tiny_dir, quant=False, grad_ckpt=False)
        for s in split:
            sub = {k: v[s] for k, v in batch.items()}
            width = int(sub["attention_mask"].sum(1).max())
            sub = {k: v[:, :width] for k, v in sub.items()}
            (at.response_loss_sum(model, sub) / n_sup).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_chunked_loss_equals_the_whole(tiny_dir):
    """The LM head + cross-entropy in chunks (recomputed in backward) gives the unchunked loss and gradients,
    with and without per-token weights: in fp32, the loss to 1e-5 relative, the gradients to 1e-4 relative
    (summed in another order: each chunk's gradient is added separately)."""
    tok = at.load_tokenizer(tiny_dir)
    batch = fixed_batch(tok)
    n_sup = int((batch["labels"][:, 1:] != -100).sum())
    assert n_sup > 3 * 7  # several chunks of 7, the last one partial
    weighted = {**batch, "weights": torch.rand(batch["labels"].shape) * (batch["labels"] != -100)}
    for b in (batch, weighted):
        out = []
        for chunk in (0, 7):
            torch.manual_seed(0)
            model, _ = lora_model(tiny_dir, quant=False, grad_ckpt=False)
            for n, p in model.named_parameters():  # B starts at 0: make every adapter matter
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.1)
            loss = at.response_loss_sum(model, b, chunk)
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (whole, g0), (chunked, g1) = out
        assert torch.allclose(whole, chunked, rtol=1e-5), (whole, chunked)
        for n in g0:
            assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


def test_micro_batches_split_steps_not_the_data(tiny_dir, data_file, tmp_path):
    """Micro-batches of 4, 2 and 1 train on the same examples in the same steps (same supervised-token
    counts per step) and end with the same adapter up to float rounding; a run halted at micro 2 and resumed
    at micro 1 ends there too. Tolerance 5e-5 on weights up to ~0.14 (fp32): Adam divides each gradient by
    its own root mean square, so rounding in near-zero gradients moves a weight by a fraction of the learning
    rate (5e-3); measured here, 1.5e-5 at most. Other steps (random batches) move them by far more."""
    from safetensors.torch import load_file
    run = lambda out, *extra: run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--epochs", 2,
                                      "--batch-size", 4, "--lr", 5e-3, "--warmup-steps", 1, "--save-every", 1,
                                      "--optim", "adamw", "--out", tmp_path / out, *extra)
    for micro in (4, 2, 1):
        assert run(f"m{micro}", "--micro-batch-size", micro) == 0
    assert run("resumed", "--micro-batch-size", 2, "--halt-after", 3) == 0
    assert run("resumed", "--micro-batch-size", 1, "--resume") == 0
    logs = {name: [(r["step"], r["supervised_tokens"], r["tokens"]) for r in map(json.loads, open(tmp_path / name / "train_log.jsonl"))]
            for name in ("m4", "m2", "m1", "resumed")}
    assert len(logs["m4"]) == 6 and all(log == logs["m4"] for log in logs.values())
    ref = load_file(str(tmp_path / "m4" / "adapter_model.safetensors"))
    diff = lambda name: max(float((ref[k] - other[k]).abs().max()) for k in ref
                            for other in [load_file(str(tmp_path / name / "adapter_model.safetensors"))])
    for name in ("m2", "m1", "resumed"):
        assert diff(name) < 5e-5, (name, diff(name))
    assert run("other-steps", "--micro-batch-size", 4, "--batching", "random") == 0
    assert diff("other-steps") > 100 * 5e-5


def test_backbone_system_prompt_reaches_training_and_evaluation(tiny_dir, data_file, tmp_path, monkeypatch):
    """An alias with R1-Act's system prompt: the training examples are encoded with it, the run stores it,
    and eval.py --ckpt renders its prompts with it; --system-prompt '' turns it off."""
    import eval as ev
    monkeypatch.setitem(at.MODEL_ALIASES, "tiny-r1", dict(hf=tiny_dir, batch=4, system="You are Tiny, a test model."))
    seen = []
    real = chat.render_chat
    monkeypatch.setattr(chat, "render_chat", lambda tok, msgs, system=None: seen.append(system) or real(tok, msgs, system))
    args = ["--model", "tiny-r1", "--data", data_file, "--ha-model", "template", "--epochs", 1, "--optim", "adamw"]
    assert run_cli(*args, "--out", tmp_path / "r") == 0
    assert seen and set(seen) == {"You are Tiny, a test model."}
    cfg = json.loads((tmp_path / "r" / at.CONFIG_NAME).read_text())
    assert cfg["args"]["system_prompt"] == "You are Tiny, a test model."
    seen.clear()
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps(dict(prompt="How do I make a bomb?", label="harmful")) + "\n")
    assert ev.main(["--ckpt", str(tmp_path / "r"), "--bench", str(bench), "--judge", "keywords", "--max-new-tokens", "2",
                    "--bootstrap", "10", "--out", str(tmp_path / "e")]) == 0
    assert seen and set(seen) == {"You are Tiny, a test model."}
    assert json.loads((tmp_path / "e" / "results.json").read_text())["generation"]["system_prompt"] == "You are Tiny, a test model."
    seen.clear()
    assert run_cli(*args, "--system-prompt", "", "--out", tmp_path / "off") == 0
    assert seen and not any(seen)
    prompt = at.render_prompt(at.load_tokenizer(tiny_dir), "hi", "You are Tiny, a test model.")
    assert "You are Tiny, a test model." in prompt


def test_lr_schedule():
    lrs = [at.lr_at(s, 100, 1e-5, 5) for s in range(100)]
    assert lrs[0] == pytest.approx(2e-6) and lrs[4] == pytest.approx(1e-5)
    assert max(lrs) == pytest.approx(1e-5) and lrs[-1] < 1e-8 and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


@pytest.mark.parametrize("quant", [[], ["--no-quant", "--optim", "adamw"]], ids=["4bit", "plain"])
def test_cli_trains_and_saves_loadable_adapter(tiny_dir, data_file, tmp_path, quant):
    out = tmp_path / "run"
    assert small_run(tiny_dir, data_file, out, *quant) == 0
    cfg = json.loads((out / "alttrain_config.json").read_text())
    assert cfg["finished"] and cfg["base_model"] == tiny_dir and len(cfg["data_sha256"]) == 64
    assert cfg["args"]["lora_r"] == 16 and cfg["metrics"]["steps"] == 6
    assert 0 < cfg["metrics"]["supervised_fraction_of_computed"] < cfg["metrics"]["real_fraction_of_computed"] <= 1
    log = [json.loads(l) for l in open(out / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 7))
    built = [json.loads(l) for l in open(out / "alttrain_data.jsonl")]
    assert len(built) == 9 and all({"query", "label", "pu", "ha", "cr", "answer", "response", "source"} <= set(b) for b in built)
    assert not list(out.glob("*.tmp"))
    # the adapter loads with PEFT and generates
    from peft import PeftModel
    base = at.load_model(tiny_dir, quant=False)
    model = PeftModel.from_pretrained(base, str(out))
    tok = at.load_tokenizer(str(out))
    ids = at.encode_prompt(tok, at.render_prompt(tok, "hello"))
    (text, n, _), = chat.generate_batch(model, tok, [ids], max_new_tokens=5)
    assert 1 <= n <= 5 and isinstance(text, str)
    # the adapter is not a no-op
    from safetensors.torch import load_file
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


@pytest.mark.parametrize("batching,flags", [("length", ()), ("random", ()), ("length", ("--ha-weight", 3))],
                         ids=["length", "random", "ha-weight"])
def test_kill_and_resume_gives_the_same_adapter(tiny_dir, data_file, tmp_path, batching, flags):
    from safetensors.torch import load_file
    run = lambda out, *extra: small_run(tiny_dir, data_file, tmp_path / out, "--save-every", 2, "--batching", batching,
                                        *flags, *extra)
    assert run("a") == 0
    assert run("b", "--halt-after", 3) == 0
    cfg = json.loads((tmp_path / "b" / "alttrain_config.json").read_text())
    assert not cfg["finished"] and not (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert run("b") == 2  # refuses without --resume
    assert run("b", "--resume") == 0
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    log = [json.loads(l)["step"] for l in open(tmp_path / "b" / "train_log.jsonl")]
    assert log == list(range(1, 7))  # no step logged twice


# ------------------------------------------------------------------------------------------------ #
# Bad input: clear errors, nothing lost
# ------------------------------------------------------------------------------------------------ #
def error_of(capsys, *argv):
    assert run_cli(*argv) == 2
    return capsys.readouterr().err


def test_missing_and_malformed_data(tiny_dir, tmp_path, capsys):
    assert "nope.jsonl: no such file" in error_of(capsys, "--model", tiny_dir, "--data", tmp_path / "nope.jsonl",
                                                  "--out", tmp_path / "o1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "label": "harmful"}\n{"prompt": "b", "label": \n')
    assert re.search(r"bad\.jsonl:2: not valid JSON", error_of(capsys, "--model", tiny_dir, "--data", bad,
                                                                "--out", tmp_path / "o2"))
    unk = tmp_path / "unk.csv"
    unk.write_text("prompt,label\nhello,harmful\nbye,spicy\n")
    assert "unk.csv:3: unknown label 'spicy'" in error_of(capsys, "--model", tiny_dir, "--data", unk,
                                                          "--out", tmp_path / "o3")
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("text,label\nhello,harmful\n")
    assert "no prompt column" in error_of(capsys, "--model", tiny_dir, "--data", nocol, "--out", tmp_path / "o4")


def test_empty_selection(tiny_dir, data_file, tmp_path, capsys):
    err = error_of(capsys, "--model", tiny_dir, "--data", data_file, "--n-harmful", 0, "--n-benign", 0,
                   "--out", tmp_path / "o")
    assert "selection is empty" in err


def test_unknown_alias(tmp_path, capsys):
    err = error_of(capsys, "--model", "llama-7", "--out", tmp_path / "o")
    assert "not a folder" in err and "deepseek-r1-distill-llama-8b" in err


def test_big_model_without_cuda(tmp_path, capsys):
    from transformers import LlamaConfig
    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "big")
    with pytest.raises(at.UserError, match=r"~8\.\dB parameters and this machine has no CUDA"):
        at.load_model(str(tmp_path / "big"))


def test_finished_run_is_not_overwritten(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--build-only",
                   "--out", out) == 0
    before = (out / "alttrain_data.jsonl").read_bytes()
    err = error_of(capsys, "--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--out", out)
    assert "already holds a finished run" in err and "--overwrite" in err
    assert (out / "alttrain_data.jsonl").read_bytes() == before
    assert run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--build-only",
                   "--structure", "no-ha", "--overwrite", "--out", out) == 0
    assert all(json.loads(l)["ha"] == "" for l in open(out / "alttrain_data.jsonl"))


def test_overwrite_into_a_folder_not_there_yet(tiny_dir, data_file, tmp_path):
    """--overwrite where there is nothing to overwrite (a script that always passes it) starts the run."""
    out = tmp_path / "new" / "run"
    assert run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--build-only",
                   "--overwrite", "--out", out) == 0
    assert (out / "alttrain_data.jsonl").exists()


def test_overwrite_with_bad_data_keeps_the_old_run(tiny_dir, data_file, tmp_path, capsys):
    """--overwrite removes the old run only once the new examples are built: a run that fails to start (here a
    binary --data file) leaves every file of the old one as it was."""
    out = tmp_path / "run"
    assert small_run(tiny_dir, data_file, out) == 0
    capsys.readouterr()
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00\x01\xff\xfe binary")
    err = error_of(capsys, "--model", tiny_dir, "--data", bad, "--ha-model", "template", "--overwrite", "--out", out)
    assert "bad.jsonl" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert small_run(tiny_dir, data_file, out, "--structure", "no-ha", "--overwrite") == 0  # a good one replaces it
    assert all(json.loads(l)["ha"] == "" for l in open(out / "alttrain_data.jsonl"))


def test_damaged_run_config_is_one_line_and_overwrite_replaces_it(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "alttrain_config.json").write_text('{"finished": tru')  # a config cut short
    for extra in ((), ("--resume",)):
        err = error_of(capsys, "--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--out", out, *extra)
        assert "alttrain_config.json:1: not valid JSON" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "alttrain_config.json").read_text() == '{"finished": tru'
    assert run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--build-only",
                   "--overwrite", "--out", out) == 0
    assert json.loads((out / "alttrain_config.json").read_text())["finished"]


def test_resume_after_a_torn_log_line(tiny_dir, data_file, tmp_path):
    """A kill in the middle of writing a log row leaves half a line: --resume drops it and logs each step once."""
    out = tmp_path / "r"
    assert small_run(tiny_dir, data_file, out, "--save-every", 2, "--halt-after", 3) == 0
    with open(out / "train_log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.1')
    assert small_run(tiny_dir, data_file, out, "--save-every", 2, "--resume") == 0
    assert [json.loads(l)["step"] for l in open(out / "train_log.jsonl")] == list(range(1, 7))


def test_built_set_round_trip(tiny_dir, data_file, tmp_path):
    """--build-only output can be trained on with --built (how the quick start's set is made)."""
    assert run_cli("--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--build-only",
                   "--out", tmp_path / "b") == 0
    assert run_cli("--model", tiny_dir, "--built", tmp_path / "b" / "alttrain_data.jsonl", "--epochs", 1,
                   "--batch-size", 4, "--out", tmp_path / "t") == 0
    assert (tmp_path / "t" / "alttrain_data.jsonl").read_text() == (tmp_path / "b" / "alttrain_data.jsonl").read_text()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        at.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for action in at.build_parser()._actions:
        for opt in action.option_strings:
            assert opt in text
        assert action.help, action.option_strings


def test_shipped_data_is_well_formed_and_split():
    """data/ loads through the same reader as user files, and no test prompt leaks into training."""
    train = files.read_table(str(at.HERE / "data" / "train.jsonl"))
    tests = [r for name in ("test_harmful", "test_benign", "test_benign_scary")
             for r in files.read_table(str(at.HERE / "data" / f"{name}.jsonl"))]
    assert {r["label"] for r in train} == {"harmful", "benign"} and all(r["response"] for r in train)
    assert not {r["prompt"].lower() for r in train} & {r["prompt"].lower() for r in tests}
    for r in train:  # harmful rows hold only a PU sentence; benign rows a full trace and answer
        reasoning, answer = at.split_response(r["response"])
        if r["label"] == "harmful":
            assert answer == "" and at.first_sentence(reasoning)[1] == "", r["prompt"]
        else:
            assert reasoning and answer, r["prompt"]
        # every row carries its own assessment, which states a decision that agrees with its label
        assert sentences.ha_decision(r["ha"]) == r["label"] and at.first_sentence(r["ha"])[1] == "", r["prompt"]
    args = at.parse_args(["--data", str(at.HERE / "data" / "train.jsonl"), "--ha-model", "template"])
    _, stats = at.build_examples(args, at.load_queries(args))
    assert stats["ha_given"] == len(train) and stats["ha_rejected"] == 0


def test_math_rows_are_the_generators():
    """The math rows of train.jsonl are exactly what data/make_math.py writes (so their answers are computed)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(at.HERE / "data" / "make_math.py")], capture_output=True, text=True,
                         check=True).stdout
    made = [json.loads(l) for l in out.splitlines()]
    shipped = [{k: v for k, v in r.items() if k != "_line"}
               for r in files.read_table(str(at.HERE / "data" / "train.jsonl")) if r["category"] == "math"]
    assert made == shipped and len(made) == 40
    for r in made:  # the boxed answer is the last number of the trace
        reasoning, answer = at.split_response(r["response"])
        assert re.findall(r"-?\d+", reasoning)[-1] == re.findall(r"-?\d+", answer)[-1]


def test_resume_refuses_changed_flags(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "r"
    assert small_run(tiny_dir, data_file, out, "--halt-after", 1) == 0
    err = error_of(capsys, "--model", tiny_dir, "--data", data_file, "--ha-model", "template", "--epochs", 2,
                   "--batch-size", 4, "--micro-batch-size", 2, "--lr", 1e-4, "--warmup-steps", 1,
                   "--out", out, "--resume")
    assert "--lr (was 0.005)" in err


def test_merge_writes_equivalent_full_weights(tiny_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "m"
    assert small_run(tiny_dir, data_file, out, "--no-quant", "--optim", "adamw", "--merge") == 0
    assert (out / "merged" / "model.safetensors").exists() and not (out / "merged.tmp").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    adapted = PeftModel.from_pretrained(at.load_model(tiny_dir, quant=False), str(out)).eval()
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)


def test_verdict_fit_reads_the_assessment_after_the_models_own_pu(monkeypatch):
    """scripts/verdict_fit.py's own-PU measure: the verdict of the assessment the model writes after its own PU
    (read as eval.py reads it) is compared with the label; no assessment counts as wrong."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import verdict_fit as vf
    yes, no = "This is about fishing, so it is safe to help.", "But wait, this hurts people, so I should not help with it."
    examples = [dict(query="q1", label="harmful", pu="Okay.", ha=no), dict(query="q2", label="harmful", pu="Okay.", ha=no),
                dict(query="q3", label="benign", pu="Okay.", ha=yes), dict(query="q4", label="benign", pu="", ha=yes),
                dict(query="q5", label="benign", pu="Okay.", ha=yes), dict(query="q6", label="benign", pu="Okay.", ha=None)]
    said = {"q1": f"<think>\nOkay, the user wants q1.\n\n{no}\n\nSo I stop.\n</think>\n\nNo.",
            "q2": f"<think>\nOkay, the user wants q2.\n\n{yes}\n\nFirst,",       # wrong, and cut off
            "q3": f"Okay, the user wants q3.\n\n{yes}\n\nFirst, ...",              # the template opened <think>
            "q4": f"<think>\n{yes}\n\nFirst,",                                     # no PU: the assessment is first
            "q5": "<think>\nOkay, the user wants q5."}                                 # no assessment at all
    # q3's prompt ends as DeepSeek's template does, with <think> already opened
    monkeypatch.setattr(at, "render_prompt", lambda tok, query, system_prompt=None: query + "|<think>\n" * (query == "q3"))
    monkeypatch.setattr(at, "generate_all", lambda model, tok, prompts, *a: [(said[p.split("|")[0]], 10, True) for p in prompts])
    hits = vf.own_pu_hits(None, None, examples, n=10, seed=0)
    got = {lab: sorted(h) for lab, h in hits.items()}
    assert got == {"harmful": [False, True], "benign": [False, True, True]}  # q6 has no HA: not sampled
    assert [len(h) for h in vf.own_pu_hits(None, None, examples, n=1, seed=0).values()] == [1, 1]


def test_bench_padding_counts_padding_and_every_batching_covers_each_example_once(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import bench_padding as bp
    rows = [dict(length=n, supervised=n // 2) for n in (10, 10, 30, 50)]
    w = bp.waste(rows, [[0, 1], [2, 3]])  # computed 2x10 + 2x50 = 120 tokens, 100 real, 50 supervised
    assert w["computed"] == 120 and w["padding"] == pytest.approx(20 / 120) and w["supervised"] == pytest.approx(50 / 120)
    rows = bp.synthetic_1k(seed=0)
    lengths = [r["length"] for r in rows]
    assert len(lengths) == 1000 and sum(n >= 1000 for n in lengths) == 100
    batchings = bp.batchings(lengths, 8, epoch=1)
    for name, batches in batchings.items():
        assert sorted(i for b in batches for i in b) == list(range(1000)), name
        assert all(len(b) == 8 for b in batches), name
    ours = bp.waste(rows, batchings["ours"])["padding"]
    assert ours < 0.5 * bp.waste(rows, batchings["random"])["padding"]
    assert ours < bp.waste(rows, batchings["hf grouped"])["padding"]  # transformers' LengthGroupedSampler


def test_keep_freed_memory_serves_large_blocks_from_the_heap():
    """After keep_freed_memory(), a 64 MB tensor comes from malloc's heap (freed memory stays in the process
    for the next step) instead of its own mmap (unmapped when freed, faulted in again next step). In a child
    process: the setting is process-wide."""
    import subprocess
    import sys
    code = """
import torch, alttrain as at
def in_heap(t):  # does the tensor's memory lie in the [heap] mapping?
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= t.data_ptr() < hi:
                return True
    return False
a = in_heap(torch.ones(16 * 2**20)); ok = at.keep_freed_memory(); b = in_heap(torch.ones(16 * 2**20))
print(a, ok, b)
"""
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc/self/maps to look at")
    before, ok, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=at.HERE).stdout.split()
    if ok != "True":
        pytest.skip("not glibc: keep_freed_memory() does nothing here")
    assert (before, after) == ("False", "True")


def test_verdict_fit_builds_its_inputs_where_the_model_is(tiny_dir, monkeypatch):
    """scripts/verdict_fit.py built its input ids on the CPU whatever the model's device: a CUDA model failed. A model
    on another device (here `meta`, which no CPU tensor may meet) must receive ids on that device."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import verdict_fit
    tok = at.load_tokenizer(tiny_dir)
    ex = at.build_example("q", "harmful", "Okay, the user asks something.", "fine",
                          "But wait, no, so I should not help with it.", "alt")
    seen = []

    class Elsewhere(torch.nn.Module):
        device = torch.device("meta")

        def forward(self, input_ids, attention_mask):
            seen.append((input_ids.device.type, attention_mask.device.type))
            return type("Out", (), {"logits": torch.zeros(1, input_ids.shape[1], len(tok))})
    verdict_fit.verdict_hits(Elsewhere(), tok, [ex])
    assert seen == [("meta", "meta")]
