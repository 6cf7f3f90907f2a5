"""The causal LM's shape from its config alone: no weights are read and nothing is downloaded unless the hub answers.

Where the config comes from, first found wins:
1. ``--llm-config FILE`` (a config.json, or a folder holding one);
2. the embedded SmolLM2 (``llm_path: embedded``): its HF folder under ``llm_cache_dir`` once a run has built it, else
   the GGUF file's metadata (transformers' gguf reader parses the header: the tensors are neither read nor
   dequantised, ~1 s);
3. a local folder: its config.json;
4. a hub name: the local Hugging Face cache; then ``KNOWN`` below (public config.json values, so the paper's
   Qwen2-7B can be planned offline); then the hub itself (config.json only) when it can be reached.
"""
import json
import os
from pathlib import Path

from recbole_weaverec.errors import ConfigError, LLMNotFoundError
from recbole_weaverec.hf import hub
from recbole_weaverec.hf.embedded import LLM, llm_gguf
from recbole_weaverec.hf.resolve import DEFAULT_CACHE_DIR, EMBEDDED_NAMES
from recbole_weaverec.plan.formulas import Shape

LLAMA_LAYOUT = ("llama", "mistral", "qwen2", "qwen3")  # q/k/v/o + gate/up/down decoders: what formulas.py counts
_QWEN2_7B = dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
_QWEN2_05B = dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
# values of the public config.json of each hub model (the same as benchmarks/gpu_check.py's shapes)
KNOWN = {
    "Qwen/Qwen2-7B-Instruct": _QWEN2_7B,
    "Qwen/Qwen2-7B": _QWEN2_7B,
    "Qwen/Qwen2-0.5B-Instruct": _QWEN2_05B,
    "Qwen/Qwen2-0.5B": _QWEN2_05B,
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
}


def shape_of(config, name="?"):
    """A ``Shape`` from a transformers config (or a plain dict of config.json keys: transformers' config class
    of its model_type fills in what the file leaves out, as loading the model would)."""
    kind = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if kind not in LLAMA_LAYOUT:
        raise ConfigError(f"llm model_type {kind!r} ({name}) is not planned: the planner counts Llama-layout "
                          f"decoders only ({', '.join(LLAMA_LAYOUT)})")
    if isinstance(config, dict):
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config)
    get = lambda key, default=None: getattr(config, key, default)  # noqa: E731
    try:
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return Shape(hidden=hidden, intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
                     heads=heads, kv_heads=int(get("num_key_value_heads") or heads),
                     head_dim=int(get("head_dim") or hidden // heads), vocab=int(get("vocab_size")),
                     tied=bool(get("tie_word_embeddings", False)),
                     qkv_bias=kind == "qwen2" or bool(get("attention_bias", False)),
                     qk_norm=kind == "qwen3", name=name)
    except (TypeError, ValueError):
        raise ConfigError(f"the LM config of {name} lacks a size (hidden_size, intermediate_size, "
                          f"num_hidden_layers, num_attention_heads, vocab_size are needed)") from None


def _auto(path, **kwargs):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, **kwargs)


def _from_file(path):
    path = Path(os.path.expanduser(str(path)))
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"--llm-config {path} is not a config.json file (nor a folder holding one)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--llm-config {file} is not readable JSON ({e})") from None


def llm_shape(llm_path, cache_dir=None, config_file=None):
    """(Shape, where its config came from) of ``llm_path`` as a run would resolve it."""
    if config_file:
        return shape_of(_from_file(config_file), str(config_file)), f"--llm-config {config_file}"
    if llm_path in EMBEDDED_NAMES:
        folder = Path(os.path.expanduser(str(cache_dir or DEFAULT_CACHE_DIR / "llm"))) / "SmolLM2-135M-Instruct"
        if (folder / "config.json").is_file():
            return shape_of(_from_file(folder), "embedded SmolLM2-135M"), f"{folder}/config.json"
        gguf = llm_gguf()
        return (shape_of(_auto(gguf.parent, gguf_file=gguf.name), "embedded SmolLM2-135M"),
                f"GGUF metadata of {gguf.name}")
    path = str(llm_path)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise LLMNotFoundError(LLM.no_config.format(folder=expanded))
        return shape_of(_from_file(expanded), path), f"{expanded}/config.json"
    if path.startswith(("/", ".", "~")) or path.count("/") > 1:
        raise LLMNotFoundError(LLM.not_found.format(folder=expanded))
    if hub.in_cache(path):
        return shape_of(_auto(path, local_files_only=True), path), "the Hugging Face cache"
    if path in KNOWN:
        return shape_of(KNOWN[path], path), "the planner's table of public configs (plan/shapes.py)"
    why = hub.unavailable_reason(path)
    if why:
        raise LLMNotFoundError(f"llm_path {path!r}: its config is not on this machine ({why}) and not in the "
                               f"planner's table ({', '.join(KNOWN)}); pass --llm-config FILE.json")
    return shape_of(_auto(path), path), "the Hugging Face hub (config.json only)"
