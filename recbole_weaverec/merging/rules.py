"""The merge rules, on plain ``{name: tensor}`` mappings and nothing else (no model, no files): peft's task
arithmetic, TIES, DARE and magnitude pruning per module (``merge_deltas``), lazy weighted sums of LoRA deltas
(``WeightedDeltas``), and full-model task vectors with task- or layer-wise coefficients (MergeRec)."""
import contextlib
import re
from collections.abc import Mapping

import torch
from peft.utils import merge_utils

from recbole_weaverec.errors import AdapterMismatchError, MergeError

MERGE_METHODS = ("average", "weights", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
TASK_VECTOR_METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
# a transformer block's index in a parameter name: "encoder.layer.3.", "model.layers.11.", "h.0.", "blocks.2."
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?=\.|$)")


class LazyDeltas(Mapping):
    """A read-only {module: ΔW} whose tensors are computed on access (and not kept), so a model's adapters cost
    their small factors in memory, not one dense copy of every adapted weight each; ``shape(key)`` is free."""

    def shape(self, key):
        raise NotImplementedError


class MergeOfDeltas(LazyDeltas):
    """A lazy merge of K compatible delta sources (``_deltas``) over their shared modules (``_keys``)."""

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key):
        return _shape(self._deltas[0], key)


class WeightedDeltas(MergeOfDeltas):
    """Σ_i w_i·ΔW_i per module with peft's task arithmetic, computed on access. ``weights``: None (1/K, the
    average), K numbers, or {module: K numbers} (a row per module, as WeaveRec's learned merge)."""

    def __init__(self, deltas, weights=None, names=None):
        self._deltas = list(deltas)
        self._keys = check_compatible(self._deltas, names)
        k = len(self._deltas)
        if isinstance(weights, Mapping):
            self._rows = {key: _weights(weights[key], k, "weights") for key in self._keys}
        else:
            row = _weights(weights, k, "average" if weights is None else "weights")
            self._rows = dict.fromkeys(self._keys, row)

    def __getitem__(self, key):
        tensors = [d[key].float() for d in self._deltas]
        with torch.no_grad():
            return merge_utils.task_arithmetic(tensors, self._rows[key].to(tensors[0].device))


def _shape(deltas, key):
    return tuple(deltas.shape(key)) if isinstance(deltas, LazyDeltas) else tuple(deltas[key].shape)


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
        for key in first:
            if _shape(other, key) != _shape(first, key):
                raise AdapterMismatchError(
                    f"adapters {names[0]!r} and {name!r} disagree on {key!r}: shape {_shape(first, key)} vs "
                    f"{_shape(other, key)} (different base models?)"
                )
    return list(first)


def _short(items, n=5):
    if not items:
        return "none"
    more = f" ... ({len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


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

