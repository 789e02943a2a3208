"""Intention analysis prompting (IA; Zhang et al. 2024), a baseline defence without training: first ask the
model for the query's essential intention, then ask it to answer with that intention in view."""
from __future__ import annotations

from .chat import encode_prompt, generate_batch, render_chat, render_prompt, template_opens_think
from .files import PROMPTS
from .records import split_output


def intention_analysis(model, tok, batch: list[dict], max_new: int, args) -> tuple[list[str], list[dict]]:
    """Intention analysis (IA; Zhang et al. 2024), stage 1: ask each query's essential intention. Returns
    the stage-2 prompts - the same conversation, the intention as the assistant's earlier turn (its final
    answer only), then the request to answer - and the stage-1 outputs, kept in each record."""
    ask = (PROMPTS / "ia_intention.txt").read_text(encoding="utf-8").strip()
    then = (PROMPTS / "ia_answer.txt").read_text(encoding="utf-8").strip()
    questions = [ask.format(query=it["prompt"]) for it in batch]
    first = [render_prompt(tok, q, args.system_prompt) for q in questions]
    outs = generate_batch(model, tok, [encode_prompt(tok, p) for p in first], max_new,
                             do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)
    second, extra = [], []
    for q, p, (text, n_tokens, _) in zip(questions, first, outs):
        _, intention, closed = split_output(text, template_opens_think(p))
        intention = intention if closed and intention else text.strip()
        second.append(render_chat(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": intention},
                                           {"role": "user", "content": then}], args.system_prompt))
        extra.append(dict(intention=intention, intention_tokens=n_tokens))
    return second, extra
