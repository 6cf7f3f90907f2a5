"""Applying deltas to a model: resolving their names to weights, folding them in place (``fold_deltas``), and
computing with W0 + ΔW without copying W0 (``patched``), with ΔW either given or learned (``LearnedDeltaMerge``)."""
import contextlib
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from recbole_weaverec.errors import AdapterMismatchError, MergeError
from recbole_weaverec.merging.rules import _shape, check_compatible, layer_groups

PEFT_PREFIX = "base_model.model."


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
    for key in deltas:
        found = _resolve(model, key)
        if found is None:
            raise AdapterMismatchError(f"{what}: {key!r} is not a weight of the model {type(model).__name__}")
        module, attr = found
        shape = tuple(getattr(module, attr).shape) if not parametrize.is_parametrized(module, attr) else tuple(
            module.parametrizations[attr].original.shape)
        if shape != _shape(deltas, key):
            raise AdapterMismatchError(
                f"{what}: {key!r} has shape {_shape(deltas, key)} but the model's weight has {shape} "
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

    def key_weights(self):
        """{key: its [K] mixing weights} (detached), e.g. for ``WeightedDeltas`` once λ is fitted."""
        w = self.weights().detach().float().cpu()
        return {k: w[self._group[k]] for k in self.keys}

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
        get, shapes = merge.__getitem__, {k: _shape(merge, k) for k in merge}
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

