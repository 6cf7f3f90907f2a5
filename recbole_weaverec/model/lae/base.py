"""Shared machinery of the closed-form linear autoencoders (EASE, RLAE, RDLAE, L3AE).

A subclass implements ``solve(G)`` -> the item-item weight matrix B (n x n, zero diagonal) from the Gram matrix
G = XᵀX, in place where it can: only one n x n matrix (plus a Cholesky factor while solving) is ever alive.
Scores are X_u · B, computed on demand per batch of users. A sweep (``sweep.py``) passes ``cache``: G (and what else
does not depend on ``sweep_keys``) is then kept and ``refit`` solves B again for new values of those keys.
"""
import numpy as np
import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType, ModelType

from recbole_weaverec.checks import check_choice
from recbole_weaverec.model.abstract import ModelHooks

DTYPES = {"float32": torch.float32, "float64": torch.float64}
TIE_BREAKS = ("none", "random", "popularity")
TEST_HISTORIES = ("train", "train_valid")
TIE_EPS = 1e-6  # relative to a user's largest |score|: far below any real score gap, above float32 rounding of ties


def solve_spd_inverse(A):
    """(A)⁻¹ for a symmetric positive definite A, overwriting nothing the caller keeps."""
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:  # not positive definite (e.g. a negative regulariser): fall back to a general inverse
        P = torch.linalg.inv(A)
    else:
        P = torch.cholesky_inverse(L)
    # LAPACK returns column-major storage; P is symmetric, so its transpose view is the same matrix in row-major
    # order (row-wise sparse products over B are ~20x slower on column-major storage)
    return P if P.is_contiguous() else P.mT


class LinearAutoencoder(ModelHooks, GeneralRecommender):
    input_type = InputType.POINTWISE
    type = ModelType.TRADITIONAL
    sweep_keys = ()  # the hyperparameters that only ``solve`` reads: a sweep changes them on a built model
    cache = None  # None: nothing kept between solves (a normal run keeps B only, no G beside it)

    @classmethod
    def validate_config(cls, config):
        check_choice(config, "lae_dtype", tuple(DTYPES))
        check_choice(config, "tie_break", TIE_BREAKS)
        check_choice(config, "test_history", TEST_HISTORIES)

    def __init__(self, config, dataset, cache=None):
        super().__init__(config, dataset)
        self.validate_config(config)
        self.config = config
        self.dtype = DTYPES[config["lae_dtype"]]
        self.tie_break = config["tie_break"]
        self.test_history = config["test_history"]
        self.dummy_param = torch.nn.Parameter(torch.zeros(1))  # RecBole's trainer needs one parameter

        self.train_history = dataset.inter_matrix(form="csr").astype(np.float32)  # users x items, training rows
        self.history = self.train_history  # the rows that are scored (before_test may add the validation rows)
        self.cache = cache
        # not persistent: recomputed from the data in __init__, so checkpoints stay small and pickle-free
        self.register_buffer("item_similarity", self._similarity(dataset), persistent=False)
        self.register_buffer("tie_order", self._tie_order(dataset, config["seed"]), persistent=False)

    def gram(self):
        """G = XᵀX of the training rows, dense, on the model's device and dtype."""
        X = self.train_history
        return torch.from_numpy((X.T @ X).toarray()).to(device=self.device, dtype=self.dtype)

    def _similarity(self, dataset):
        if self.cache is None:
            G = self.gram()
        else:  # solve overwrites its G: the kept one is solved on a copy
            if "gram" not in self.cache:
                self.cache["gram"] = self.gram()
            G = self.cache["gram"].clone()
        B = self.solve(G, dataset)
        del G
        B.fill_diagonal_(0.0)
        return B

    def refit(self, dataset):
        """B again for the current ``sweep_keys`` of ``self.config`` (a model built with ``cache``), scoring the
        training rows again (``before_test`` may have added the validation rows)."""
        self.item_similarity = None  # the old B goes before the new solve allocates
        self.item_similarity = self._similarity(dataset)
        self.history = self.train_history

    def solve(self, G, dataset):
        raise NotImplementedError

    def _tie_order(self, dataset, seed):
        """A per-item value in [0, 1) added (scaled by TIE_EPS) to scores so that ties break reproducibly."""
        n = self.n_items
        if self.tie_break == "random":
            gen = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(n, generator=gen).to(torch.float64)
        elif self.tie_break == "popularity":
            pop = np.asarray(self.train_history.sum(axis=0)).ravel()
            rank = np.empty(n, dtype=np.float64)
            rank[np.argsort(pop, kind="stable")] = np.arange(n)  # most popular gets the largest bonus
            order = torch.from_numpy(rank)
        else:
            order = torch.zeros(n, dtype=torch.float64)
        return (order / max(n, 1)).to(device=self.device, dtype=self.dtype)

    def before_test(self, valid_data):
        """``test_history: train_valid`` scores the test split from train + validation rows, as sequential models
        see the validation item in their input (RecBole's default for general models is train only)."""
        if self.test_history == "train_valid":
            self.history = self.history + valid_data._dataset.inter_matrix(form="csr").astype(np.float32)
            self.history.data[:] = np.minimum(self.history.data, 1.0)

    def _user_scores(self, users):
        # sparse rows @ B: reads only the B rows of the user's items (a dense row would stream all of B per user)
        rows = self.history[users].tocoo()
        rows = torch.sparse_coo_tensor(
            torch.from_numpy(np.vstack([rows.row, rows.col]).astype(np.int64)), torch.from_numpy(rows.data),
            size=rows.shape, check_invariants=False).to(device=self.device, dtype=self.dtype)
        scores = torch.sparse.mm(rows, self.item_similarity)
        if self.tie_break != "none":
            scale = scores.abs().amax(dim=1, keepdim=True).clamp_min(1.0) * TIE_EPS
            scores = scores + scale * self.tie_order
        return scores

    def calculate_loss(self, interaction):
        return torch.nn.Parameter(torch.zeros(1))

    def forward(self):
        pass

    def predict(self, interaction):
        users = interaction[self.USER_ID].cpu().numpy()
        items = interaction[self.ITEM_ID].to(self.device)
        unique, inverse = np.unique(users, return_inverse=True)
        scores = self._user_scores(unique)  # one row per distinct user in the batch
        inverse = torch.from_numpy(inverse).to(self.device)
        return scores[inverse, items].float()

    def full_sort_predict(self, interaction):
        users = interaction[self.USER_ID].cpu().numpy()
        return self._user_scores(users).float().flatten()
