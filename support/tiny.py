"""Tiny random models for tests and benchmarks: a LlamaForCausalLM from a small config and a byte-level
BPE tokenizer with a DeepSeek-R1-style chat template. Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
# DeepSeek-R1's template, shortened to what matters here: BOS written by the template, the reasoning
# before </think> stripped from assistant turns, and (since Feb 2025) '<think>\n' opening the generation.
R1_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}{% if '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<｜Assistant｜>' + c + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}OPEN{% endif %}")
CORPUS = ("the user is asking how to make a bomb okay so I should not help with this harmful request "
          "I'm sorry, but I can't help with that. this is a harmless question so it is safe to help "
          "the capital of France is Paris. think about the problem step by step and answer ") * 4


def make_tokenizer(folder: str | Path, opens_think: bool = True, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>"]
    tk.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(["<think>", "</think>"])  # added but not special, as in DeepSeek's tokenizer
    template = R1_TEMPLATE.replace("OPEN", "{{ '<think>\\n' }}" if opens_think else "")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return tok


def make_model(folder: str | Path, opens_think: bool = True, hidden: int = 64, layers: int = 2, seed: int = 0,
               init_std: float = 0.02):
    """A random Llama (~100K parameters) and its tokenizer, saved as a normal HF folder. A large init_std
    makes the output depend strongly on the context (for tests that must see a context change)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = make_tokenizer(folder, opens_think)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=tok.bos_token_id, initializer_range=init_std,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return str(folder)


if __name__ == "__main__":
    import sys
    print(make_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
