"""Adapter and task-vector arithmetic shared by LLMMerge, WeaveRec and MergeRec.

Everything works on plain dicts ``{name: tensor}``:

* **LoRA deltas** (LLMMerge, WeaveRec): ``lora_deltas`` turns a peft LoRA adapter into
  ``{module name: ΔW = scale·B·A}`` in the layout of the module's weight. Merging at the ΔW level is exact
  (mixing A and B separately is not), and it lets adapters of different ranks be merged.
* **Task vectors** (MergeRec): ``task_vector`` gives ``{parameter name: θ_k − θ_base}``.

The merge rules themselves are peft's (``peft.utils.merge_utils``: task arithmetic, TIES, DARE, magnitude
pruning). This module only adds what peft lacks: reading deltas from adapter folders, compatibility checks with
one-line errors, folding deltas into a plain model, merges whose coefficients are learned (differentiable in the
coefficients, the trim/sign masks computed once), and layer grouping for layer-wise coefficients.
"""
import contextlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from peft.utils import merge_utils
from peft.utils.other import get_pattern_key
from torch import nn
from torch.nn.utils import parametrize

from recbole_weaverec.config import ConfigError

PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_METHODS = ("average", "weights", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
TASK_VECTOR_METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
_PEFT_MARKERS = ("lora_", "modules_to_save", "trainable_tokens")  # peft tensors that are not base weights
# a transformer block's index in a parameter name: "encoder.layer.3.", "model.layers.11.", "h.0.", "blocks.2."
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?=\.|$)")


class MergeError(ConfigError):
    """Bad merge input (unknown method, bad weights/density); a ConfigError, so the CLI prints one line."""


class AdapterMismatchError(MergeError):
    """Adapters or task vectors that cannot be merged: other base model, other modules or shapes."""


class UnsupportedAdapterError(MergeError):
    """An adapter whose effect is not an additive ΔW on weights (DoRA, LoRA bias, modules_to_save, conv LoRA...)."""


class AdapterNotFoundError(FileNotFoundError):
    """An adapter folder without adapter_config.json or adapter weights."""


class AdapterFileError(MergeError):
    """An adapter folder whose files are unreadable or disagree: malformed JSON, truncated or overwritten weights,
    a rank in adapter_config.json that its weights do not have."""


# --------------------------------------------------------------------------------------------- reading adapters
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


def lora_deltas(adapter, base_model=None, adapter_name=None):
    """{module name: ΔW} (float32, weight layout of the module) of a peft LoRA adapter.

    ``adapter`` is a saved adapter folder (adapter_config.json + adapter_model.safetensors), a
    ``(state_dict, LoraConfig or dict)`` pair (keys as saved, or with the adapter name as in ``model.state_dict()``;
    then ``adapter_name`` picks one when there are several) or a PeftModel. ΔW = (α/r)·B·A, with r, α from
    ``rank_pattern``/``alpha_pattern`` and α/√r under ``use_rslora``; transposed for ``fan_in_fan_out``. Module
    names have peft's ``base_model.model.`` prefix removed (e.g. ``model.layers.0.self_attn.q_proj``). With
    ``base_model`` (a torch module), every name must resolve to a weight of the same shape.
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
    deltas = {}
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
        delta = (b.float() @ a.float()) * scale
        if emb or config.get("fan_in_fan_out"):  # peft stores these transposed w.r.t. the weight
            delta = delta.T.contiguous()
        deltas[module] = delta
    if base_model is not None:
        _resolve_all(base_model, deltas, what=label)
    return deltas


def check_compatible(delta_dicts, names=None):
    """Same modules and ΔW shapes in every dict (ranks may differ), else AdapterMismatchError naming both sides.

    Returns the list of module names (in the first dict's order).
    """
    delta_dicts = list(delta_dicts)
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(delta_dicts))]
    if len(names) != len(delta_dicts):
        raise MergeError(f"{len(names)} names for {len(delta_dicts)} adapters")
    if not delta_dicts:
        raise MergeError("nothing to merge: no adapters given")
    first = delta_dicts[0]
    for name, other in zip(names[1:], delta_dicts[1:]):
        if set(other) != set(first):
            only_a = sorted(set(first) - set(other))
            only_b = sorted(set(other) - set(first))
            raise AdapterMismatchError(
                f"adapters {names[0]!r} and {name!r} adapt different modules: only in {names[0]!r}: "
                f"{_short(only_a)}; only in {name!r}: {_short(only_b)}"
            )
        for key, value in first.items():
            if tuple(other[key].shape) != tuple(value.shape):
                raise AdapterMismatchError(
                    f"adapters {names[0]!r} and {name!r} disagree on {key!r}: shape {tuple(value.shape)} vs "
                    f"{tuple(other[key].shape)} (different base models?)"
                )
    return list(first)


def _short(items, n=5):
    if not items:
        return "none"
    more = f" ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


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


# ------------------------------------------------------------------------------------------------- merging
def _check_method(method, allowed):
    if method not in allowed:
        raise MergeError(f"unknown merge method {method!r}; allowed: {', '.join(allowed)}")


def _check_density(density, method):
    if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise MergeError(f"density must be in (0, 1] for {method}, got {density!r}")


def _weights(weights, k, method):
    if method == "average":
        if weights is not None:
            raise MergeError("merge method 'average' takes no weights (it uses 1/K); use 'weights' for given ones")
        return torch.full((k,), 1.0 / k)
    if weights is None:
        raise MergeError(f"merge method {method!r} needs one weight per adapter ({k})")
    weights = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
    if weights.numel() != k:
        raise MergeError(f"{weights.numel()} merge weights for {k} adapters")
    return weights


@contextlib.contextmanager
def _seeded(seed):
    """Run with torch's CPU generator seeded (DARE's random drops), leaving the global state as it was."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def merge_deltas(delta_dicts, weights=None, method="average", density=0.2, majority_sign_method="total",
                 names=None, seed=None):
    """Merge K delta dicts module by module with peft's rule -> {module: merged ΔW} (float32).

    ``method``: ``average`` (weights 1/K, no weights given), ``weights`` / ``task_arithmetic`` (Σ w_i ΔW_i),
    ``ties`` (trim each ΔW to ``density``, elect signs by ``majority_sign_method``, weighted disjoint mean),
    ``dare_linear`` / ``dare_ties`` (random drop to ``density`` and rescale; ``seed`` makes it reproducible),
    ``magnitude_prune`` (trim, then weighted sum). ``names`` label adapters in errors.
    """
    _check_method(method, MERGE_METHODS)
    if majority_sign_method not in SIGN_METHODS:
        raise MergeError(f"unknown majority_sign_method {majority_sign_method!r}; allowed: {', '.join(SIGN_METHODS)}")
    _check_density(density, method)
    keys = check_compatible(delta_dicts, names)
    w = _weights(weights, len(delta_dicts), method)
    merged = {}
    with torch.no_grad(), _seeded(seed):
        for key in keys:
            tensors = [d[key].float() for d in delta_dicts]
            wk = w.to(tensors[0].device)
            if method in ("average", "weights", "task_arithmetic"):
                merged[key] = merge_utils.task_arithmetic(tensors, wk)
            elif method in ("ties", "dare_ties"):
                merged[key] = getattr(merge_utils, method)(tensors, wk, density, majority_sign_method)
            else:
                merged[key] = getattr(merge_utils, method)(tensors, wk, density)
    return merged


# ------------------------------------------------------------------------------------- applying to a model
def _resolve(model, key):
    """(module, parameter name) that ``key`` names in ``model``: a parameter name ('x.weight') or a module name
    ('x', meaning its weight; a peft LoRA layer means its base layer), with or without 'base_model.model.'."""
    bare = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    is_peft = isinstance(getattr(model, "base_model", None), nn.Module) and hasattr(model.base_model, "model")
    candidates = [PEFT_PREFIX + bare, bare] if is_peft else [bare, PEFT_PREFIX + bare]
    for cand in candidates:
        path, _, attr = cand.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            module = None
        if module is not None and (attr in module._parameters or parametrize.is_parametrized(module, attr)):
            return module, attr
        try:
            module = model.get_submodule(cand)
        except AttributeError:
            continue
        module = getattr(module, "base_layer", module)
        if "weight" in module._parameters or parametrize.is_parametrized(module, "weight"):
            return module, "weight"
    return None


def _resolve_all(model, deltas, what="deltas"):
    """Resolve every key before anything is changed, so a bad key leaves the model untouched."""
    targets = []
    for key, delta in deltas.items():
        found = _resolve(model, key)
        if found is None:
            raise AdapterMismatchError(f"{what}: {key!r} is not a weight of the model {type(model).__name__}")
        module, attr = found
        shape = tuple(getattr(module, attr).shape) if not parametrize.is_parametrized(module, attr) else tuple(
            module.parametrizations[attr].original.shape)
        if shape != tuple(delta.shape):
            raise AdapterMismatchError(
                f"{what}: {key!r} has shape {tuple(delta.shape)} but the model's weight has {shape} "
                "(adapter trained on another base model?)"
            )
        targets.append((key, module, attr))
    return targets


def fold_deltas(model, deltas, alpha=1.0):
    """W ← W + alpha·ΔW in place for every entry of ``deltas`` (module or parameter names, with or without
    peft's prefix); keeps each weight's dtype and device; returns ``model``. The folded model computes like the
    merged adapter at the cost of the base model ("zero inference overhead")."""
    targets = _resolve_all(model, deltas, what="fold_deltas")
    with torch.no_grad():
        for key, module, attr in targets:
            param = getattr(module, attr)
            param.copy_((param.float() + alpha * deltas[key].to(param.device, torch.float32)).to(param.dtype))
    return model


# ---------------------------------------------------------------------------------- full-model task vectors
def task_vector(finetuned_state, base_state, keys=None):
    """{k: θ_finetuned[k] − θ_base[k]} (float32, detached) over ``keys`` (default: every floating-point entry of
    ``base_state``); a missing key or another shape raises AdapterMismatchError naming it."""
    if keys is None:
        keys = [k for k, v in base_state.items() if torch.is_tensor(v) and v.is_floating_point()]
        extra = sorted(k for k, v in finetuned_state.items()
                       if torch.is_tensor(v) and v.is_floating_point() and k not in base_state)
        if extra:
            raise AdapterMismatchError(f"fine-tuned model has parameters the base lacks: {_short(extra)}")
    tv = {}
    for k in keys:
        if k not in finetuned_state or k not in base_state:
            side = "fine-tuned" if k not in finetuned_state else "base"
            raise AdapterMismatchError(f"parameter {k!r} missing from the {side} model")
        ft, base = finetuned_state[k], base_state[k]
        if tuple(ft.shape) != tuple(base.shape):
            raise AdapterMismatchError(
                f"parameter {k!r}: shape {tuple(ft.shape)} (fine-tuned) vs {tuple(base.shape)} (base): "
                "different encoders or vocabularies"
            )
        tv[k] = (ft.detach().float() - base.detach().to(ft.device).float())
    return tv


def layer_groups(state_keys):
    """Group parameter names by layer for layer-wise coefficients -> (group_of {key: index}, group names).

    Parameters of transformer block N ('encoder.layer.N.', 'model.layers.N.', 'h.N.', 'blocks.N.') share the group
    named by that prefix; every other parameter (embeddings, norms, pooler, heads) gets its own module's group.
    Groups are numbered in order of first appearance.
    """
    group_of, names, index = {}, [], {}
    for key in state_keys:
        m = _BLOCK.search(key)
        label = key[:m.end()] if m else key.rsplit(".", 1)[0] if "." in key else key
        if label not in index:
            index[label] = len(names)
            names.append(label)
        group_of[key] = index[label]
    return group_of, names


def prepare_task_vectors(task_vectors, method="task_arithmetic", density=0.2, majority_sign_method="total",
                         trim_scope="global", seed=None):
    """Apply the coefficient-independent part of a merge once -> list of K dicts (detached, float32) such that
    the merge is ``θ_base + Σ_k c_k · prepared_k``.

    ``task_arithmetic``/``average``: unchanged. ``magnitude_prune``: trimmed to ``density``. ``dare_linear``:
    random drop + rescale. ``ties``/``dare_ties``: trimmed (or dropped), masked to the elected sign and divided by
    the number of agreeing tasks, so coefficients c equal peft's ``ties(weights=c)``. ``trim_scope``: ``global``
    trims each task vector as one flattened vector (TIES paper), ``tensor`` trims each parameter separately (peft).
    """
    _check_method(method, TASK_VECTOR_METHODS)
    if majority_sign_method not in SIGN_METHODS:
        raise MergeError(f"unknown majority_sign_method {majority_sign_method!r}; allowed: {', '.join(SIGN_METHODS)}")
    if trim_scope not in ("global", "tensor"):
        raise MergeError(f"unknown trim_scope {trim_scope!r}; allowed: global, tensor")
    _check_density(density, method)
    keys = check_compatible(task_vectors, [f"task vector {i}" for i in range(len(task_vectors))])
    with torch.no_grad(), _seeded(seed):
        vectors = [{k: tv[k].detach().float() for k in keys} for tv in task_vectors]
        if method in ("average", "task_arithmetic"):
            return vectors
        how = "magnitude" if method in ("ties", "magnitude_prune") else "random"
        rescale = how == "random"
        if trim_scope == "global":
            sizes = [vectors[0][k].numel() for k in keys]
            pruned = []
            for tv in vectors:
                flat = merge_utils.prune(torch.cat([tv[k].reshape(-1) for k in keys]), density, how, rescale)
                pruned.append({k: p.view_as(tv[k]) for k, p in zip(keys, torch.split(flat, sizes))})
            vectors = pruned
        else:
            vectors = [{k: merge_utils.prune(tv[k], density, how, rescale) for k in keys} for tv in vectors]
        if method in ("magnitude_prune", "dare_linear"):
            return vectors
        for k in keys:  # elect sign and keep each task's share of the disjoint mean
            stacked = torch.stack([tv[k] for tv in vectors])
            mask = merge_utils.calculate_majority_sign_mask(stacked, method=majority_sign_method)
            share = stacked * mask / torch.clamp(mask.sum(dim=0), min=1.0)
            for tv, s in zip(vectors, share):
                tv[k] = s
    return vectors


def _coefficient_index(coefficients, keys, layer_of):
    """-> function key -> coefficient column [K] (task-wise: the same for all keys)."""
    if coefficients.dim() == 1:
        return lambda key: coefficients
    if coefficients.dim() != 2:
        raise MergeError(
            f"coefficients must be [K] (task-wise) or [K, L] (layer-wise), got {tuple(coefficients.shape)}")
    if layer_of is None:
        layer_of, names = layer_groups(keys)
        if coefficients.shape[1] != len(names):
            raise MergeError(f"layer-wise coefficients have {coefficients.shape[1]} columns but the parameters form "
                             f"{len(names)} layer groups (layer_groups)")
    get = layer_of.__getitem__ if isinstance(layer_of, Mapping) else layer_of
    for key in keys:
        g = get(key)
        if not 0 <= g < coefficients.shape[1]:
            raise MergeError(f"layer group {g} of {key!r} outside the {coefficients.shape[1]} coefficient columns")
    return lambda key: coefficients[:, get(key)]


def combine_task_vectors(base_state, prepared, coefficients, layer_of=None):
    """θ_base + Σ_k c_k·prepared_k for every key of ``prepared`` (other keys of ``base_state`` passed through).

    ``coefficients``: tensor [K] (task-wise) or [K, L] (layer-wise; ``layer_of`` maps a key to its column,
    a dict or callable, default ``layer_groups``). Differentiable in ``coefficients`` (they may require grad);
    the result keeps each base tensor's dtype and device.
    """
    coefficients = torch.as_tensor(coefficients)
    k = len(prepared)
    if coefficients.shape[0] != k:
        raise MergeError(f"{coefficients.shape[0]} coefficient rows for {k} task vectors")
    keys = list(prepared[0])
    column = _coefficient_index(coefficients, keys, layer_of)
    merged = dict(base_state)
    for key in keys:
        base = base_state[key]
        c = column(key).to(base.device, torch.float32)
        total = base.float()
        for i in range(k):
            total = total + c[i] * prepared[i][key].to(base.device)
        merged[key] = total.to(base.dtype)
    return merged


def apply_task_vectors(base_state, task_vectors, coefficients=None, method="task_arithmetic", density=0.2,
                       majority_sign_method="total", granularity="task", layer_of=None, trim_scope="global",
                       seed=None):
    """Merged state dict θ_base + Σ_k c_k·τ̂_k, where τ̂ = ``prepare_task_vectors(task_vectors, method, ...)``.

    ``coefficients``: [K] for ``granularity='task'``, [K, L] for ``'layer'`` (see ``combine_task_vectors``);
    None only with ``method='average'`` (1/K). Masks are computed without grad, so the result is differentiable
    in the coefficients only. For repeated calls (learning coefficients) prepare once and use
    ``combine_task_vectors``.
    """
    if granularity not in ("task", "layer"):
        raise MergeError(f"unknown merge granularity {granularity!r}; allowed: task, layer")
    if coefficients is None:
        if method != "average":
            raise MergeError(f"merge method {method!r} needs coefficients (one per task vector)")
        coefficients = torch.full((len(task_vectors),), 1.0 / len(task_vectors))
    coefficients = torch.as_tensor(coefficients)
    if coefficients.dim() != (1 if granularity == "task" else 2):
        raise MergeError(f"granularity {granularity!r} needs coefficients of shape "
                         f"{'[K]' if granularity == 'task' else '[K, L]'}, got {tuple(coefficients.shape)}")
    prepared = prepare_task_vectors(task_vectors, method, density, majority_sign_method, trim_scope, seed)
    return combine_task_vectors(base_state, prepared, coefficients, layer_of)


# ----------------------------------------------------------------------------------------- learned merging
class LearnedDeltaMerge(nn.Module):
    """Learned combination of K frozen delta dicts: ΔW_key = Σ_i w_i(group of key)·ΔW_i,key.

    ``lam`` (the only parameters) has shape [G, K]: one row per group. ``groups``: ``'module'`` (one row per key:
    WeaveRec's λ per adapted module), ``'shared'`` (one row: task-wise), ``'layer'`` (``layer_groups``), or a
    dict/callable key -> group label. ``normalize='softmax'`` gives w = softmax(λ/T) over K (WeaveRec; init 1.0 =
    plain average); ``'none'`` uses λ as raw coefficients (MergeRec / AdaMerging, e.g. init 0.2 on task vectors or
    1.0 on ``prepare_task_vectors(..., 'ties')`` output). Deltas are stored once, stacked, as buffers (``dtype``).
    """

    def __init__(self, deltas, names=None, init=1.0, temperature=1.0, normalize="softmax", groups="module",
                 dtype=torch.float32):
        super().__init__()
        if normalize not in ("softmax", "none"):
            raise MergeError(f"unknown normalize {normalize!r}; allowed: softmax, none")
        if not temperature > 0:
            raise MergeError(f"merge temperature must be > 0, got {temperature!r}")
        keys = check_compatible(deltas, names)
        self.keys = keys
        self.normalize, self.temperature = normalize, float(temperature)
        if groups == "module":
            labels = {k: k for k in keys}
        elif groups == "shared":
            labels = {k: "all" for k in keys}
        elif groups == "layer":
            labels = layer_groups(keys)[0]
        elif isinstance(groups, Mapping):
            labels = {k: groups[k] for k in keys}
        elif callable(groups):
            labels = {k: groups(k) for k in keys}
        else:
            raise MergeError(f"unknown groups {groups!r}; allowed: module, shared, layer, a dict or a callable")
        order = list(dict.fromkeys(labels.values()))
        self.group_names = order
        self._group = {k: order.index(labels[k]) for k in keys}
        self._index = {k: i for i, k in enumerate(keys)}
        for i, k in enumerate(keys):  # buffers follow .to(device); names cannot contain dots
            self.register_buffer(f"delta_{i}", torch.stack([d[k].detach().to(dtype) for d in deltas]),
                                 persistent=False)
        lam = torch.as_tensor(init, dtype=torch.float32)
        self.lam = nn.Parameter(lam.expand(len(order), len(deltas)).clone())

    def weights(self):
        """[G, K] mixing weights (softmax(λ/T) or λ)."""
        return torch.softmax(self.lam / self.temperature, dim=-1) if self.normalize == "softmax" else self.lam

    def delta(self, key, weights=None):
        """Merged ΔW of one key (differentiable in λ)."""
        w = (self.weights() if weights is None else weights)[self._group[key]]
        stacked = getattr(self, f"delta_{self._index[key]}")
        return torch.tensordot(w.to(stacked.dtype), stacked, dims=1)

    def merged(self):
        """{key: merged ΔW} for every key (differentiable in λ)."""
        w = self.weights()
        return {k: self.delta(k, w) for k in self.keys}


class _AddDelta(nn.Module):
    """Parametrization W -> W + ΔW(key); the delta source is held as a plain callable, not as a submodule, so
    the merge's λ does not become a parameter of the patched model."""

    def __init__(self, get, key):
        super().__init__()
        self._get, self._key = get, key

    def forward(self, weight):
        return weight + self._get(self._key).to(weight.device, weight.dtype)


@contextlib.contextmanager
def patched(model, merge):
    """Context in which ``model`` computes with W0 + ΔW for every key of ``merge`` (a LearnedDeltaMerge, or a
    dict of delta tensors, possibly requiring grad), without copying W0 (torch parametrizations).

    Inside, all model parameters are frozen (their requires_grad flags are restored on exit), so gradients reach
    only the merge's parameters; on exit the original weight tensors are put back unchanged. For inference wrap
    calls in ``torch.nn.utils.parametrize.cached()`` so each ΔW is computed once per forward.
    """
    if isinstance(merge, LearnedDeltaMerge):
        get, shapes = merge.delta, {k: getattr(merge, f"delta_{i}").shape[1:] for i, k in enumerate(merge.keys)}
    elif isinstance(merge, Mapping):
        get, shapes = merge.__getitem__, {k: v.shape for k, v in merge.items()}
    else:
        raise MergeError(f"patched() needs a LearnedDeltaMerge or a dict of deltas, got {type(merge).__name__}")
    targets = _resolve_all(model, {k: torch.empty(s, device="meta") for k, s in shapes.items()}, what="patched")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    done = []
    try:
        for key, module, attr in targets:
            parametrize.register_parametrization(module, attr, _AddDelta(get, key), unsafe=True)
            done.append((module, attr))
        yield model
    finally:
        for module, attr in reversed(done):
            parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        for p, flag in flags:
            p.requires_grad_(flag)
