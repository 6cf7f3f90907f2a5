"""MergeRec's task vectors in the form the learned merge uses: one [K, N] matrix and a flat θ_base.

Row k holds domain k's (prepared) task vector τ̂_k = θ_k − θ_base with every merged parameter flattened (state dict
order). The merge θ(c) = θ_base + Σ_k c_k·τ̂_k is then one matrix-vector product per parameter (``addmv`` over its
columns) instead of 2K element-wise passes, and its gradient in c is the transposed product, taken as soon as
that parameter's gradient is ready (no per-domain temporaries, no whole-model gradient buffer). Same values as
``merging.combine_task_vectors`` up to float rounding (the sum is taken in another order).

Rows are written one domain at a time (``set_task_vector``), so a caller never holds all K fine-tuned states.
``dtype=torch.bfloat16`` stores the K rows in bfloat16 (half the largest buffer; θ_base and the coefficients stay
float32): the products are then taken in float32 over column blocks, so only the stored values are rounded.
"""
import torch
from peft.utils import merge_utils

from recbole_weaverec.errors import MergeError
from recbole_weaverec.merging import task_vector

VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK = 1 << 16  # columns per float32 block of a bfloat16 product (K x 64k floats: stays in cache)


class _BlockedProduct(torch.autograd.Function):
    """base + Vᵀc for a [K, n] ``vectors`` slice stored in a low-precision dtype: float32 arithmetic one column
    block at a time (no float32 copy of the slice is kept, so none is saved for backward either)."""

    @staticmethod
    def forward(ctx, base, vectors, column):
        out = torch.empty_like(base)
        for s in range(0, base.numel(), BLOCK):
            torch.addmv(base[s:s + BLOCK], vectors[:, s:s + BLOCK].float().t(), column, out=out[s:s + BLOCK])
        ctx.save_for_backward(vectors)
        return out

    @staticmethod
    def backward(ctx, grad):
        (vectors,) = ctx.saved_tensors
        out = grad.new_zeros(vectors.shape[0])
        for s in range(0, grad.numel(), BLOCK):
            out.addmv_(vectors[:, s:s + BLOCK].float(), grad[s:s + BLOCK])
        return None, None, out


class StackedTaskVectors:
    """``keys``: the merged (floating-point) entries of ``base_state``; ``group_of``: key -> coefficient column for
    layer-wise coefficients (None: task-wise); ``dtype``: storage of the task vectors (float32 | bfloat16). Other
    entries of ``base_state`` pass through unchanged."""

    def __init__(self, base_state, keys, n_tasks, group_of=None, device=None, dtype=torch.float32):
        if dtype not in VECTOR_DTYPES.values():
            raise MergeError(f"task vector dtype {dtype} is not allowed: expected one of {', '.join(VECTOR_DTYPES)}")
        device = torch.device(device) if device is not None else base_state[keys[0]].device
        self.device = device
        self.keys = list(keys)
        self.shapes = [base_state[k].shape for k in self.keys]
        self.dtypes = [base_state[k].dtype for k in self.keys]
        self.sizes = [base_state[k].numel() for k in self.keys]
        self.groups = [group_of[k] for k in self.keys] if group_of is not None else None
        merged = set(keys)
        self.passthrough = {k: v for k, v in base_state.items() if k not in merged}
        n = sum(self.sizes)
        self.base = torch.empty(n, dtype=torch.float32, device=device)
        for key, _, offset, size in self._offsets():  # key by key: no second whole copy on the device
            self.base[offset:offset + size].copy_(base_state[key].detach().reshape(-1))
        self.vectors = torch.empty(n_tasks, n, dtype=dtype, device=device)  # rows: set_task_vector
        self.filled = [False] * n_tasks

    def __len__(self):
        return self.vectors.shape[0]

    def _offsets(self):
        offset = 0
        for key, shape, size in zip(self.keys, self.shapes, self.sizes):
            yield key, shape, offset, size
            offset += size

    def row(self, i):
        """Task vector i as {key: view into row i} (writing to a view writes the row)."""
        return {k: self.vectors[i, o:o + n].view(shape) for k, shape, o, n in self._offsets()}

    def set_task_vector(self, i, finetuned_state, base_state):
        """Row i = θ_i − θ_base (``merging.task_vector``'s checks and float32 arithmetic, one key at a time, so no
        second copy of a whole task vector exists). AdapterMismatchError names a missing key or another shape."""
        for key, _, offset, size in self._offsets():
            tv = task_vector(finetuned_state, base_state, [key])[key]
            self.vectors[i, offset:offset + size].copy_(tv.reshape(-1))
        self.filled[i] = True

    @torch.no_grad()
    def prepare(self, method, density):
        """Apply the merge initialisation's coefficient-independent part in place: task arithmetic and average leave
        the rows as they are; TIES (``merging.prepare_task_vectors``'s rule: each task vector trimmed to ``density``
        as one flattened vector, signs elected by total mass, each task's share of the disjoint mean) is done on
        the stacked rows themselves, one row and then one column block at a time, with peft's functions, so its
        temporaries stay those of one row (not float32 copies of all K task vectors)."""
        if not all(self.filled):
            raise MergeError(f"task vectors {[i for i, f in enumerate(self.filled) if not f]} of {len(self)} were "
                             f"never set (set_task_vector)")
        if method in ("task_arithmetic", "average"):
            return self
        if method != "ties":  # the methods MergeRec initialises from; others: merging.prepare_task_vectors
            raise MergeError(f"merge initialisation {method!r} is not allowed here: expected task_arithmetic, "
                             f"average or ties")
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise MergeError(f"density must be in (0, 1] for ties, got {density!r}")
        if density < 1:
            for i in range(len(self)):
                self.vectors[i].copy_(merge_utils.magnitude_based_pruning(self.vectors[i], density))
        for s in range(0, self.vectors.shape[1], 16 * BLOCK):
            block = self.vectors[:, s:s + 16 * BLOCK]
            values = block.float()
            mask = merge_utils.calculate_majority_sign_mask(values, method="total")
            block.copy_(values * mask / torch.clamp(mask.sum(dim=0), min=1.0))
        return self

    def merged(self, coefficients):
        """{key: θ(c)[key]} in fp32 (the parameter's dtype if another), differentiable in ``coefficients`` ([K]
        task-wise, [K, L] layer-wise), plus the pass-through entries."""
        if self.groups is None:
            columns = None
        else:
            columns = [coefficients[:, g] for g in range(coefficients.shape[1])]
        out = dict(self.passthrough)
        for i, (key, shape, offset, size) in enumerate(self._offsets()):
            column = coefficients if columns is None else columns[self.groups[i]]
            base, vectors = self.base[offset:offset + size], self.vectors[:, offset:offset + size]
            if vectors.dtype == torch.float32:
                value = torch.addmv(base, vectors.t(), column)
            else:
                value = _BlockedProduct.apply(base, vectors, column)
            out[key] = value.view(shape) if self.dtypes[i] == torch.float32 else value.view(shape).to(self.dtypes[i])
        return out

    @torch.no_grad()
    def state(self, coefficients):
        """The merged state dict for ``load_state_dict`` (no graph)."""
        return self.merged(coefficients.detach())
