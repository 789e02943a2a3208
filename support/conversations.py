"""Multi-turn evaluation: replaying a fixed conversation (the model's own answers fed back, as a chat keeps
them), and Crescendo (an attacker model steering turn by turn; its side is in support/crescendo.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from .chat import encode_prompt, generate_batch, render_chat, template_opens_think
from .files import UserError
from .records import in_item_order, resume, split_output


def kept_in_history(text: str, prompt: str) -> str:
    """What an assistant turn leaves in the conversation: its final answer only, as DeepSeek's template
    keeps history (it drops everything before </think>); a turn whose <think> never closed stays whole.
    Multi-turn replay and Crescendo's target send this. The answer is stripped: R1's template, given the whole
    output, would keep the "\n\n" after </think> (the only difference, tests/test_r1_template.py). Stripping here
    rather than in the template keeps the history the same under a template that would keep earlier reasoning."""
    _, answer, closed = split_output(text, template_opens_think(prompt))
    return answer if closed else text.strip()


def generate_conversations(model, tok, items: list[dict], path: Path, args) -> list[dict]:
    """Multi-turn replay: the model answers each user turn in order and its own answers are fed back.
    Conversations are batched at the same turn (left padding); each finished conversation is appended to
    `path` at once, so a killed run resumes without losing or repeating one. The record's output fields
    are its last turn's; every turn is kept under 'turns_out'."""
    if args.defense != "none":
        raise UserError(f"--defense {args.defense} applies to single-turn prompts, not to conversations ({path.stem})")
    done, todo = resume(path, items, args)
    model.eval()
    bar = tqdm(total=len(items), initial=len(done), desc=f"conversations {path.stem}", unit="conversation")
    with open(path, "a", encoding="utf-8") as f:
        for k in range(0, len(todo), args.batch_size):
            batch = todo[k:k + args.batch_size]
            history = [[] for _ in batch]
            turns = [[] for _ in batch]
            for t in range(max(len(it["turns"]) for it in batch)):
                live = [j for j, it in enumerate(batch) if t < len(it["turns"])]
                prompts = [render_chat(tok, history[j] + [{"role": "user", "content": batch[j]["turns"][t]}],
                                          args.system_prompt) for j in live]
                outs = generate_batch(model, tok, [encode_prompt(tok, p) for p in prompts], args.max_new_tokens,
                                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p)
                for j, prompt, (text, n_tokens, finished) in zip(live, prompts, outs):
                    reasoning, answer, closed = split_output(text, template_opens_think(prompt))
                    turns[j].append(dict(turn=t, user=batch[j]["turns"][t], output=text, reasoning=reasoning,
                                         answer=answer, think_closed=closed, finished=finished, new_tokens=n_tokens))
                    history[j] += [{"role": "user", "content": batch[j]["turns"][t]},
                                   {"role": "assistant", "content": kept_in_history(text, prompt)}]
            for it, tr, hist in zip(batch, turns, history):
                last = tr[-1]
                rec = dict(**it, **{k: last[k] for k in ("output", "reasoning", "answer", "think_closed", "finished",
                                                         "new_tokens")},
                           reasoning_tokens=len(tok(last["reasoning"], add_special_tokens=False).input_ids),
                           answer_tokens=len(tok(last["answer"], add_special_tokens=False).input_ids),
                           turns_out=tr, history=hist, judges={}, defense=args.defense)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                done.append(rec)
            f.flush()
            os.fsync(f.fileno())
            bar.update(len(batch))
    bar.close()
    return in_item_order(done, items)


