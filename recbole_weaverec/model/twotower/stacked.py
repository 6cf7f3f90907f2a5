"""MergeRec's task vectors in the form the learned merge uses: one [K, N] matrix and a flat θ_base.

Row k holds domain k's (prepared) task vector τ̂_k = θ_k − θ_base with every merged parameter flattened (state dict
order). The merge θ(c) = θ_base + Σ_k c_k·τ̂_k is then one matrix-vector product per parameter (``addmv`` over its
columns) instead of 2K element-wise passes, and its gradient in c is the transposed product, taken as soon as
that parameter's gradient is ready (no per-domain temporaries, no whole-model gradient buffer). Same values as
``merging.combine_task_vectors`` up to float rounding (the sum is taken in another order).

Rows are written one domain at a time (``set_task_vector``), so a caller never holds all K fine-tuned states.
"""
import torch

from recbole_weaverec.errors import MergeError
from recbole_weaverec.merging import prepare_task_vectors, task_vector


class StackedTaskVectors:
    """``keys``: the merged (floating-point) entries of ``base_state``; ``group_of``: key -> coefficient column for
    layer-wise coefficients (None: task-wise). Other entries of ``base_state`` pass through unchanged."""

    def __init__(self, base_state, keys, n_tasks, group_of=None, device=None):
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
        self.vectors = torch.empty(n_tasks, n, dtype=torch.float32, device=device)  # rows: set_task_vector
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
        """Apply the merge initialisation's coefficient-independent part (``merging.prepare_task_vectors``: TIES
        trims and elects signs; task arithmetic and average leave the rows as they are) in place."""
        if not all(self.filled):
            raise MergeError(f"task vectors {[i for i, f in enumerate(self.filled) if not f]} of {len(self)} were "
                             f"never set (set_task_vector)")
        rows = [self.row(i) for i in range(len(self))]
        prepared = prepare_task_vectors(rows, method=method, density=density)
        for i, (row, new) in enumerate(zip(rows, prepared)):
            for key in self.keys:
                if new[key].data_ptr() != row[key].data_ptr():  # TIES made new tensors; the others are the rows
                    row[key].copy_(new[key])
                new[key] = None  # TIES's copies are freed row by row as they are written back
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
            value = torch.addmv(self.base[offset:offset + size], self.vectors[:, offset:offset + size].t(), column)
            out[key] = value.view(shape) if self.dtypes[i] == torch.float32 else value.view(shape).to(self.dtypes[i])
        return out

    @torch.no_grad()
    def state(self, coefficients):
        """The merged state dict for ``load_state_dict`` (no graph)."""
        return self.merged(coefficients.detach())
