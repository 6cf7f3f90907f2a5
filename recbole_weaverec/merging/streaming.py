"""Merging that fits next to a large model: one adapted weight at a time, on that weight's device.

* ``MergedDeltas``: {module: merged ΔW} of K LoRA adapters by one of peft's rules (the same arithmetic as
  ``merge_deltas``), each ΔW computed from the adapters' factors when it is read and not kept.
* ``fold_merged``: W ← W + ΔW weight by weight; each ΔW is computed on the weight's own device (only its LoRA
  factors travel there), added and freed before the next, so the memory above the model and the adapters' factors
  is that of the largest adapted layer (K ΔW and peft's stack of them), whatever the depth.
* ``FactorMerge``: a learned merge in factor form. The coefficients multiply each adapter's B·A on the fly; while λ is
  fitted (``applied``) a Linear layer computes x·W0ᵀ + Σ_i c_i·(x·A_iᵀ)·B_iᵀ, so no dense ΔW exists at all.

Why: at Qwen2-7B (28 layers, all-linear LoRA r=16) a dense merge holds every merged ΔW (6.5e9 numbers: 26 GB in
fp32) and a stacked learned merge K × 13 GB in bf16; the factors are 4e7 numbers per adapter and the largest ΔW
(18944 × 3584) 0.27 GB in fp32.
"""
import contextlib
from collections.abc import Mapping

import torch
from peft.utils import merge_utils
from torch import nn

from recbole_weaverec.errors import AdapterMismatchError, MergeError
from recbole_weaverec.merging.adapters import LoraDeltas
from recbole_weaverec.merging.apply import _resolve_all, patched
from recbole_weaverec.merging.rules import (MERGE_METHODS, SIGN_METHODS, LazyDeltas, MergeOfDeltas, _check_density,
                                            _check_method, _shape, _weights, check_compatible, layer_groups)

LINEAR_METHODS = ("average", "weights", "task_arithmetic")


def _factors(deltas, key):
    """(A, B, scale, transposed) of ``key`` in a LoraDeltas (``lora_deltas(..., lazy=True)``)."""
    return deltas._factors[key]  # noqa: SLF001 - same package; LoraDeltas keeps its factors there


def _home(deltas, key):
    """The device a delta source holds ``key`` on (its factors' device for LoRA adapters)."""
    return _factors(deltas, key)[0].device if isinstance(deltas, LoraDeltas) else deltas[key].device


def delta_on(deltas, key, device):
    """ΔW of ``key`` in float32 on ``device``: for a LoRA adapter from its factors moved there (r·(in+out) numbers,
    not the dense ΔW), with the same arithmetic as ``LoraDeltas``; for a dict, its tensor moved."""
    if isinstance(deltas, LoraDeltas):
        a, b, scale, transposed = _factors(deltas, key)
        delta = (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scale
        return delta.T if transposed else delta
    return deltas[key].to(device, torch.float32)


@contextlib.contextmanager
def _seeded(seed, device):
    """torch's generators of the CPU and ``device`` seeded inside (DARE's random drops), restored after."""
    if seed is None:
        yield
        return
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


class MergedDeltas(MergeOfDeltas):
    """The merge of ``merge_deltas(deltas, weights, method, ...)`` with each ΔW computed on access, on ``device``
    (default: where the adapters are) or, through ``fold_merged``, on the device of the weight it goes into.

    ``weights`` may also be {module: K numbers} (a row per module, a learned merge) with a linear method. ``seed``
    seeds DARE's drops over one pass in key order (``fold_merged``), as ``merge_deltas`` does."""

    def __init__(self, deltas, weights=None, method="average", density=0.2, majority_sign_method="total",
                 names=None, seed=None, device=None):
        _check_method(method, MERGE_METHODS)
        if majority_sign_method not in SIGN_METHODS:
            raise MergeError(f"unknown majority_sign_method {majority_sign_method!r}; allowed: "
                             f"{', '.join(SIGN_METHODS)}")
        _check_density(density, method)
        self._deltas = list(deltas)
        self._keys = check_compatible(self._deltas, names)
        k = len(self._deltas)
        if isinstance(weights, Mapping):
            if method not in LINEAR_METHODS[1:]:
                raise MergeError(f"per-module weights need merge method 'weights' or 'task_arithmetic', not {method!r}")
            self._rows = {key: _weights(weights[key], k, "weights") for key in self._keys}
        else:
            self._rows = dict.fromkeys(self._keys, _weights(weights, k, method))
        self.method, self.density, self.sign_method = method, density, majority_sign_method
        self.seed, self.device = seed, device

    def delta(self, key, device=None):
        device = device or self.device or _home(self._deltas[0], key)
        tensors = [delta_on(d, key, device) for d in self._deltas]
        w = self._rows[key].to(device)
        with torch.no_grad():
            if self.method in LINEAR_METHODS:
                return merge_utils.task_arithmetic(tensors, w)
            if self.method in ("ties", "dare_ties"):
                return getattr(merge_utils, self.method)(tensors, w, self.density, self.sign_method)
            return getattr(merge_utils, self.method)(tensors, w, self.density)

    def __getitem__(self, key):
        return self.delta(key)


def fold_merged(model, merged, alpha=1.0):
    """W ← W + alpha·ΔW for every key of ``merged`` (a ``MergedDeltas``, a LoRA adapter's ``LoraDeltas`` or a
    dict), one weight at a time on the weight's device; every key is resolved first, so a bad key leaves the model
    untouched. Same values as ``fold_deltas(model, merge_deltas(...))``; returns ``model``."""
    targets = _resolve_all(model, merged, what="fold_merged")
    if not targets:
        return model
    device = getattr(targets[0][1], targets[0][2]).device
    with torch.no_grad(), _seeded(getattr(merged, "seed", None), device):
        for key, module, attr in targets:
            param = getattr(module, attr)
            if isinstance(merged, MergedDeltas):
                delta = merged.delta(key, param.device)
            else:
                delta = delta_on(merged, key, param.device)
            param.copy_((param.float() + alpha * delta).to(param.dtype))
            del delta  # freed before the next layer's ΔW is made
    return model


def _group_labels(groups, keys):
    if groups == "module":
        return {k: k for k in keys}
    if groups == "shared":
        return dict.fromkeys(keys, "all")
    if groups == "layer":
        return layer_groups(keys)[0]
    if isinstance(groups, Mapping):
        return {k: groups[k] for k in keys}
    if callable(groups):
        return {k: groups(k) for k in keys}
    raise MergeError(f"unknown groups {groups!r}; allowed: module, shared, layer, a dict or a callable")


class FactorMerge(nn.Module):
    """Learned combination of K frozen LoRA adapters in factor form: ΔW_key = Σ_i w_i(group of key)·s_i·B_i·A_i.

    Same parameters and weights as ``LearnedDeltaMerge`` (``lam`` [G, K]; ``groups`` module | shared | layer | dict |
    callable; ``normalize`` softmax (w = softmax(λ/T), WeaveRec) or none), but it keeps the adapters' factors
    (buffers, no copy on their own device) instead of K stacked dense ΔW. ``deltas``: ``lora_deltas(..., lazy=True)``.
    """

    def __init__(self, deltas, names=None, init=1.0, temperature=1.0, normalize="softmax", groups="module"):
        super().__init__()
        if normalize not in ("softmax", "none"):
            raise MergeError(f"unknown normalize {normalize!r}; allowed: softmax, none")
        if not temperature > 0:
            raise MergeError(f"merge temperature must be > 0, got {temperature!r}")
        deltas = list(deltas)
        names = list(names) if names is not None else [f"adapter {i}" for i in range(len(deltas))]
        for name, d in zip(names, deltas):
            if not isinstance(d, LoraDeltas):
                raise MergeError(f"{name}: a factor-form merge needs LoRA factors (merging.lora_deltas(folder, "
                                 f"lazy=True)), got {type(d).__name__}")
        self.keys = check_compatible(deltas, names)
        self.normalize, self.temperature = normalize, float(temperature)
        labels = _group_labels(groups, self.keys)
        self.group_names = list(dict.fromkeys(labels.values()))
        self._group = {k: self.group_names.index(labels[k]) for k in self.keys}
        self._index = {k: j for j, k in enumerate(self.keys)}
        self._scale, self._transposed, self._shape = {}, {}, {}
        for j, key in enumerate(self.keys):
            parts = [_factors(d, key) for d in deltas]
            if len({p[3] for p in parts}) > 1:
                raise AdapterMismatchError(f"adapters disagree on the layout of {key!r} (fan_in_fan_out / embedding)")
            for i, (a, b, _, _) in enumerate(parts):  # buffers follow .to(device); names cannot contain dots
                self.register_buffer(f"a_{j}_{i}", a, persistent=False)
                self.register_buffer(f"b_{j}_{i}", b, persistent=False)
            self._scale[key] = [float(p[2]) for p in parts]
            self._transposed[key] = parts[0][3]
            self._shape[key] = _shape(deltas[0], key)
        self.k = len(deltas)
        lam = torch.as_tensor(init, dtype=torch.float32)
        self.lam = nn.Parameter(lam.expand(len(self.group_names), self.k).clone())

    def weights(self):
        """[G, K] mixing weights (softmax(λ/T) or λ)."""
        return torch.softmax(self.lam / self.temperature, dim=-1) if self.normalize == "softmax" else self.lam

    def key_weights(self):
        """{key: its [K] mixing weights} (detached), for ``MergedDeltas(..., method='weights')`` once λ is fitted."""
        w = self.weights().detach().float().cpu()
        return {k: w[self._group[k]] for k in self.keys}

    def _parts(self, key, weights=None):
        """[(A_i, B_i, c_i = w_i·s_i)] of ``key`` (c differentiable in λ)."""
        w = (self.weights() if weights is None else weights)[self._group[key]]
        j = self._index[key]
        return [(getattr(self, f"a_{j}_{i}"), getattr(self, f"b_{j}_{i}"), w[i] * self._scale[key][i])
                for i in range(self.k)]

    def delta(self, key, weights=None):
        """Dense merged ΔW of one key in float32 (differentiable in λ)."""
        total = sum(c * (b.float() @ a.float()) for a, b, c in self._parts(key, weights))
        return total.T if self._transposed[key] else total

    def _hook(self, key):
        def add(module, inputs, output):  # y = x·W0ᵀ + Σ_i c_i·(x·A_iᵀ)·B_iᵀ, never a dense ΔW
            x = inputs[0]
            term = sum(c * ((x.float() @ a.float().T) @ b.float().T) for a, b, c in self._parts(key))
            return output + term.to(output.dtype)
        return add

    @contextlib.contextmanager
    def applied(self, model):
        """Inside, ``model`` computes with W0 + merged ΔW for every key, W0 untouched: Linear layers through a
        forward hook on the factors, other layers (embeddings, fan_in_fan_out) through ``patched`` with their dense
        ΔW. All model parameters are frozen inside (restored on exit), so gradients reach λ only."""
        view = _FactorView(self, self.keys)
        targets = _resolve_all(model, view, what="FactorMerge")
        flags = [(p, p.requires_grad) for p in model.parameters()]
        handles, dense = [], []
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            for key, module, attr in targets:
                if isinstance(module, nn.Linear) and attr == "weight" and not self._transposed[key]:
                    handles.append(module.register_forward_hook(self._hook(key)))
                else:
                    dense.append(key)
            with patched(model, _FactorView(self, dense)) if dense else contextlib.nullcontext():
                yield model
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)


class _FactorView(LazyDeltas):
    """{key: dense merged ΔW} of some keys of a FactorMerge (differentiable), for ``patched``."""

    def __init__(self, merge, keys):
        self._merge, self._keys = merge, list(keys)

    def __getitem__(self, key):
        return self._merge.delta(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def shape(self, key):
        return self._merge._shape[key]  # noqa: SLF001
