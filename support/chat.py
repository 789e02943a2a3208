"""Chat templates and generation, shared by training and evaluation.

Traps handled here: a template may open <think> itself (DeepSeek after Feb 2025) or not, so the prompt is
checked and exactly one <think> is written; a template that already writes BOS must not get a second one
from the tokenizer; batched generation of a decoder-only model needs LEFT padding."""
from __future__ import annotations

import functools

import torch
from tqdm.auto import tqdm


def render_prompt(tok, query: str, system_prompt: str | None = None) -> str:
    """The tokenizer's own chat template with the generation prompt, no system prompt by default.
    The assistant turn is NOT rendered by the template: DeepSeek's template strips everything before
    </think> from assistant messages, which would silently delete PU, HA and CR from training data."""
    return render_chat(tok, [{"role": "user", "content": query}], system_prompt)


def render_chat(tok, messages: list[dict], system_prompt: str | None = None) -> str:
    """A conversation so far, with the generation prompt for the next assistant turn. Earlier assistant
    turns should hold only their final answers: that is what DeepSeek's template keeps of them anyway."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def template_opens_think(prompt: str) -> bool:
    """DeepSeek's template (since Feb 2025) ends the generation prompt with '<think>\\n'."""
    return prompt.rstrip().endswith("<think>")


@functools.lru_cache(maxsize=None)
def adds_bos(tok) -> bool:
    """Does this tokenizer put BOS in front of plain text? (asked once per tokenizer)"""
    return tok.bos_token_id is not None and tok("x").input_ids[:1] == [tok.bos_token_id]


def encode_prompt(tok, prompt: str) -> list[int]:
    """Token ids of a rendered prompt. Templates write BOS themselves, so tokenize without special
    tokens (else BOS appears twice); add it only where the tokenizer wants one and the template forgot."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    if adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def stop_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


@torch.no_grad()
def generate_batch(model, tok, prompt_ids: list[list[int]], max_new_tokens: int, do_sample: bool = False,
                   temperature: float = 0.6, top_p: float = 0.95) -> list[tuple[str, int, bool]]:
    """Generate for a batch of tokenized prompts -> (text, new tokens, finished with EOS) each.
    Decoder-only models need LEFT padding: with right padding the new tokens would follow pad tokens."""
    width = max(map(len, prompt_ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=model.device)
    stops = stop_ids(model, tok)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=sorted(stops), **sampling)
    results = []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        new = row if end is None else row[:end]
        results.append((tok.decode(new, skip_special_tokens=True), len(new) + (end is not None),
                        end is not None))
    return results


def generate_all(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, desc: str):
    """Batched greedy generation for rendered prompts, longest first (batches of similar length),
    results in the input order."""
    encoded = [encode_prompt(tok, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    results = [None] * len(prompts)
    model.eval()
    for k in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[k:k + batch_size]
        for i, r in zip(idx, generate_batch(model, tok, [encoded[i] for i in idx], max_new_tokens)):
            results[i] = r
    return results


def close_think(tok, prompt: str) -> str:
    """For a reasoning model writing an assessment: prefill an empty <think></think>, so its 64 tokens go
    to the sentence itself rather than to the start of a long chain of thought."""
    if template_opens_think(prompt):
        return prompt + "\n</think>\n\n"
    return prompt + "<think>\n\n</think>\n\n" if knows_think(tok) else prompt


@functools.lru_cache(maxsize=None)
def knows_think(tok) -> bool:
    """Is <think> in the vocabulary? (asked once per tokenizer: get_vocab() builds a dict of the whole 128-152K vocabulary)"""
    return "<think>" in tok.get_vocab()
