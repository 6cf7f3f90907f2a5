"""peft LoRA adapter folders: reading and checking them (one-line errors for every broken file), their ΔW
(``lora_deltas``, dense or computed from the factors on access) and their recorded base model."""
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from peft.utils.other import get_pattern_key

from recbole_weaverec.errors import (AdapterFileError, AdapterMismatchError, AdapterNotFoundError, MergeError,
                                     UnsupportedAdapterError)
from recbole_weaverec.merging.apply import PEFT_PREFIX, _resolve_all
from recbole_weaverec.merging.rules import LazyDeltas

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_PEFT_MARKERS = ("lora_", "modules_to_save", "trainable_tokens")  # peft tensors that are not base weights


def _read_json(path):
    """A JSON object from ``path``; a file that is not one is named with the line and column of the fault."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); save the "
                               f"adapter again or fix the file") from None
    except UnicodeDecodeError:
        raise AdapterFileError(f"{path} is not UTF-8 text (a JSON file was expected)") from None
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(value).__name__}, expected an object {{...}}")
    return value


def _read_adapter_config(folder):
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterNotFoundError(f"no peft adapter at {folder}: {ADAPTER_CONFIG} not found")
    return _read_json(path)


def _weights_file(folder):
    for fname in ADAPTER_WEIGHTS:
        if (folder / fname).is_file():
            return folder / fname
    found = sorted(p.name for p in folder.iterdir())
    raise AdapterNotFoundError(f"no adapter weights in {folder}: expected {' or '.join(ADAPTER_WEIGHTS)} next to "
                               f"{ADAPTER_CONFIG} (the folder holds {', '.join(found) or 'nothing'})")


def _read_weights(path, shapes_only=False):
    """{name: tensor} (or {name: shape}) of an adapter weights file; one line when it cannot be read."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            if shapes_only:  # the header alone: a cut or overwritten file already fails here
                with safe_open(str(path), "pt") as f:
                    return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)  # never a full unpickle
        if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
            raise ValueError("not a dict of tensors")
        return {k: tuple(v.shape) for k, v in state.items()} if shapes_only else state
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the file is unreadable
        # torch's weights_only message suggests weights_only=False, which must never be the answer to a bad file
        reason = "not a file of tensors" if type(e).__name__ == "UnpicklingError" else \
            (str(e).strip().splitlines() or [""])[0][:200]
        raise AdapterFileError(f"adapter weights {path} are unreadable ({type(e).__name__}: {reason}): the file is "
                               f"truncated or overwritten; train the adapter again or copy it again") from None


def _expected_rank(label, config, module):
    """The rank adapter_config.json gives ``module`` (rank_pattern, else r), or None when it gives none."""
    pattern = config.get("rank_pattern") or {}
    key = get_pattern_key(pattern.keys(), module) if pattern else None
    r = pattern[key] if key in pattern else config.get("r")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise AdapterFileError(f"{label}: {ADAPTER_CONFIG} gives {module!r} rank {r!r}: expected a positive integer")
    return r


def _check_rank(label, config, module, kind, shape):
    """A LoRA A/B matrix of ``shape`` has the rank its config gives (peft would fail on a mismatch with a
    traceback, and the ΔW scale alpha/r depends on it)."""
    if len(shape) != 2 or kind not in _LORA_PARTS:
        return
    rank = shape[0] if kind in ("lora_A", "lora_embedding_A") else shape[1]
    expected = _expected_rank(label, config, module)
    if expected is not None and rank != expected:
        raise AdapterFileError(f"{label}: {ADAPTER_CONFIG} gives {module!r} rank {expected} but its {kind} "
                               f"weights have rank {rank} (shape {tuple(shape)}): the config and the weights are "
                               f"from different adapters")


def check_adapter_folder(folder, label=None):
    """Check a saved peft adapter folder before anything reads it -> (config dict, weights file).

    One-line errors: a missing folder, adapter_config.json or weights file (AdapterNotFoundError; peft's
    ``from_pretrained`` would instead look the path up as a hub name), a JSON file of the folder that is not a
    JSON object, weights that cannot be read (truncated, overwritten), a rank in the config that the weights do
    not have (AdapterFileError). Reads only the safetensors header, so it is cheap enough for validate_config.
    """
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise AdapterNotFoundError(f"{label + ': ' if label else ''}no peft adapter at {folder}: folder not found "
                                   f"(expected a folder with {ADAPTER_CONFIG} and adapter weights)")
    label = label or str(folder)
    config = _read_adapter_config(folder)
    for other in sorted(folder.glob("*.json")):  # e.g. recbole_weaverec.json, what the adapter was trained on
        if other.name != ADAPTER_CONFIG:
            _read_json(other)
    weights = _weights_file(folder)
    for key, shape in _read_weights(weights, shapes_only=True).items():
        parsed = _parse_lora_key(key)
        if parsed is not None:
            _check_rank(label, config, parsed[0], parsed[1], shape)
    return config, weights


def check_adapter_paths(paths, allowed, owner="this model"):
    """``adapter_paths`` {key: folder}: every key names an adapter ``owner`` reads (``allowed``; another key would
    be ignored silently and a new adapter trained) and every folder passes ``check_adapter_folder``."""
    import difflib

    allowed = list(allowed)
    for key, folder in (paths or {}).items():
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            raise MergeError(f"adapter_paths key {key!r} matches no adapter of {owner}, which reads "
                             f"{', '.join(map(repr, allowed))}" + (f": did you mean {close[0]!r}?" if close else ""))
        check_adapter_folder(folder, label=f"adapter_paths[{key!r}]")


def _load_adapter(adapter, adapter_name):
    """-> (state_dict, config dict, label) from a folder, a (state_dict, config) pair or a PeftModel."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(adapter, (str, os.PathLike)):
        config, weights = check_adapter_folder(adapter)
        return _read_weights(weights), config, str(adapter)
    if isinstance(adapter, PeftModel):
        name = adapter_name or adapter.active_adapter
        if name not in adapter.peft_config:
            raise MergeError(f"adapter {name!r} not in the model; it has {sorted(adapter.peft_config)}")
        state = get_peft_model_state_dict(adapter, adapter_name=name)
        return state, adapter.peft_config[name].to_dict(), f"adapter {name!r}"
    if isinstance(adapter, (tuple, list)) and len(adapter) == 2:
        state, config = adapter
        if not isinstance(config, Mapping):
            config = config.to_dict()
        return state, dict(config), "adapter state dict"
    raise MergeError(
        f"cannot read an adapter from {type(adapter).__name__}: give a peft adapter folder, "
        "a (state_dict, LoraConfig) pair or a PeftModel"
    )


def _parse_lora_key(key):
    """'base_model.model.X.lora_A[.adapter].weight' -> (X, 'lora_A', adapter or None, last part)."""
    parts = key.split(".")
    idx = max((i for i, p in enumerate(parts) if p in _LORA_PARTS), default=None)
    if idx is None or idx == 0:
        return None
    rest = parts[idx + 1:]
    last = rest[-1] if rest and rest[-1] in ("weight", "bias") else None
    if last:
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    module = ".".join(parts[:idx])
    if module.startswith(PEFT_PREFIX):
        module = module[len(PEFT_PREFIX):]
    return module, parts[idx], (rest[0] if rest else None), last


def lora_deltas(adapter, base_model=None, adapter_name=None, lazy=False):
    """{module name: ΔW} (float32, weight layout of the module) of a peft LoRA adapter.

    ``adapter`` is a saved adapter folder (adapter_config.json + adapter_model.safetensors), a
    ``(state_dict, LoraConfig or dict)`` pair (keys as saved, or with the adapter name as in ``model.state_dict()``;
    then ``adapter_name`` picks one when there are several) or a PeftModel. ΔW = (α/r)·B·A, with r, α from
    ``rank_pattern``/``alpha_pattern`` and α/√r under ``use_rslora``; transposed for ``fan_in_fan_out``. Module
    names have peft's ``base_model.model.`` prefix removed (e.g. ``model.layers.0.self_attn.q_proj``). With
    ``base_model`` (a torch module), every name must resolve to a weight of the same shape. With ``lazy`` the
    result is a ``LoraDeltas`` mapping that computes each ΔW when it is read (the same values).
    """
    state, config, label = _load_adapter(adapter, adapter_name)
    if str(config.get("peft_type", "LORA")).upper().split(".")[-1] != "LORA":
        raise UnsupportedAdapterError(f"{label}: peft_type {config.get('peft_type')!r} is not LORA")
    if config.get("use_dora"):
        raise UnsupportedAdapterError(f"{label}: DoRA adapters are not an additive ΔW; merge LoRA adapters only")
    parts, adapters_seen = {}, set()
    # a whole PeftModel state dict (``model.state_dict()``) also holds the frozen base weights: skip those
    whole_model = any(".base_layer." in k for k in state)
    for key, value in state.items():
        parsed = _parse_lora_key(key)
        if parsed is None and whole_model and not any(m in key for m in _PEFT_MARKERS):
            continue
        if parsed is None:
            raise UnsupportedAdapterError(
                f"{label}: tensor {key!r} is not a LoRA A/B matrix (modules_to_save, DoRA or trainable tokens "
                "cannot be merged as ΔW)"
            )
        module, kind, name, last = parsed
        if last == "bias":
            raise UnsupportedAdapterError(f"{label}: LoRA bias {key!r} is not supported (train with lora_bias=False)")
        adapters_seen.add(name)
        if adapter_name is not None and name is not None and name != adapter_name:
            continue
        parts.setdefault((name, module), {})[kind] = value
    names = {n for n, _ in parts}
    if len(names) > 1:
        raise MergeError(f"{label} holds several adapters {sorted(names)}: pass adapter_name")
    if not parts:
        raise UnsupportedAdapterError(f"{label}: no LoRA weights found" + (
            f" for adapter {adapter_name!r} (found {sorted(a for a in adapters_seen if a)})" if adapter_name else ""))

    alpha_pattern = config.get("alpha_pattern") or {}
    lora_alpha = config.get("lora_alpha", 8)
    factors = {}
    for (_, module), ab in parts.items():
        emb = "lora_embedding_A" in ab or "lora_embedding_B" in ab
        a, b = (ab.get("lora_embedding_A"), ab.get("lora_embedding_B")) if emb else (ab.get("lora_A"), ab.get("lora_B"))
        if a is None or b is None:
            raise UnsupportedAdapterError(f"{label}: module {module!r} has only one of its LoRA A/B matrices")
        if a.dim() != 2 or b.dim() != 2:
            raise UnsupportedAdapterError(f"{label}: module {module!r} is not a Linear/Embedding LoRA (conv LoRA)")
        r = a.shape[0]
        _check_rank(label, config, module, "lora_A", tuple(a.shape))
        _check_rank(label, config, module, "lora_B", tuple(b.shape))
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), lora_alpha)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # peft stores embedding and fan_in_fan_out factors transposed w.r.t. the weight
        factors[module] = (a, b, scale, bool(emb or config.get("fan_in_fan_out")))
    deltas = LoraDeltas(factors)
    if base_model is not None:
        _resolve_all(base_model, deltas, what=label)
    return deltas if lazy else dict(deltas.items())


class LoraDeltas(LazyDeltas):
    """ΔW = scale·B·A of one LoRA adapter, computed from its factors on each access (float32)."""

    def __init__(self, factors):
        self._factors = factors  # {module: (A, B, scale, transposed)}

    def __getitem__(self, key):
        a, b, scale, transposed = self._factors[key]
        delta = (b.float() @ a.float()) * scale
        return delta.T.contiguous() if transposed else delta

    def __iter__(self):
        return iter(self._factors)

    def __len__(self):
        return len(self._factors)

    def shape(self, key):
        a, b, _, transposed = self._factors[key]
        return (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])


def _norm_base(name):
    if not name:
        return None
    name = str(name).rstrip("/")
    return os.path.realpath(name) if os.path.exists(name) else name


def check_same_base(adapter_folders, base_name=None):
    """Every adapter folder's ``base_model_name_or_path`` equals ``base_name`` (if given) and each other's.

    Local paths are compared after resolving them; an adapter that records no base name (a model built from a
    config) is not checked by name (shape checks in ``lora_deltas(..., base_model=)`` still apply). Raises
    AdapterMismatchError naming the adapter and both base names; returns the common base name (or None).
    """
    expected, expected_from = (base_name, "the base model") if base_name else (None, None)
    for folder in adapter_folders:
        recorded = _read_adapter_config(folder).get("base_model_name_or_path")
        if not recorded:
            continue
        if expected is None:
            expected, expected_from = recorded, f"adapter {str(folder)!r}"
        elif _norm_base(recorded) != _norm_base(expected):
            raise AdapterMismatchError(
                f"adapter {str(folder)!r} was trained on {recorded!r}, but {expected_from} is {expected!r}"
            )
    return expected

