"""L3AE (Moon, Park, Lee: "LLM-Enhanced Linear Autoencoders for Recommendation", CIKM 2025).

F (items x d) = embeddings of the item texts. Two closed-form phases (orientation as in the authors' code: the
text prior is an item-item EASE on the Gram matrix F·Fᵀ):
  1. P₁ = (F·Fᵀ + λ_F·I)⁻¹, C = −P₁·diag(1/diag P₁), diag(C) = 0           (item-item prior from text)
  2. P = (XᵀX + (λ_X + λ_E)·I)⁻¹,
     B = λ_E·P·C − P·diag((1 + λ_E·diag(P·C)) / diag P), diag(B) = 0
B minimises ‖X − XB‖² + λ_X‖B‖² + λ_E‖B − C‖² subject to diag(B) = 0; λ_X may be negative as long as
λ_X + λ_E > 0 (then XᵀX + (λ_X + λ_E)·I is positive definite).

Phase 1 uses the Woodbury identity: with K = F·(λ_F·I_d + FᵀF)⁻¹·Fᵀ, P₁ = (I − K)/λ_F, so
C_ij = K_ij / (1 − K_jj) for i ≠ j. That is the same matrix for a d x d solve instead of an n x n inverse.
"""
import torch

from recbole_weaverec.config import ConfigError
from recbole_weaverec.data import itemtext
from recbole_weaverec.checks import check_number, name_list
from recbole_weaverec.model.lae.base import LinearAutoencoder
from recbole_weaverec.textembed import encode_texts, resolve_encoder_path

ROW_BLOCK = 2048  # rows per block of the in-place products (bounds the extra memory to ROW_BLOCK x n)


def _check_positive_int(config, key):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}={value!r} is not allowed: expected an integer >= 1")
    return value


def item_text_embeddings(config, dataset, device=None):
    """F (float32, items x d): one row per internal item id, row 0 (the padding item) zero; cached on disk."""
    fields = list(name_list(config["text_fields"]))  # "[movie_title]" from the command line, too
    itemtext.check_fields(dataset, fields, require_all=True)
    texts = itemtext.item_texts(dataset, fields)
    emb = encode_texts(
        texts, encoder_path=config["text_encoder_path"], batch_size=config["text_batch_size"],
        max_length=config["text_max_length"], device=device, cache_dir=config["text_cache_dir"],
        normalize=config["text_normalize"], cache_key=f"{dataset.dataset_name}.{','.join(fields)}",
        progress=config["show_progress"])
    emb[0] = 0.0  # the padding item has no text and must get no prior weight
    return emb


class L3AE(LinearAutoencoder):
    sweep_keys = ("reg_weight_x", "reg_weight_f", "reg_weight_e")

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        lx = check_number(config, "reg_weight_x")
        check_number(config, "reg_weight_f", low=0, low_open=True)
        le = check_number(config, "reg_weight_e", low=0)
        if lx + le <= 0:
            raise ConfigError(f"reg_weight_x + reg_weight_e = {lx} + {le} = {lx + le} is not allowed: the sum must "
                              f"be > 0 (reg_weight_x may be negative only when reg_weight_e outweighs it)")
        fields = name_list(config["text_fields"])
        if not fields or not all(isinstance(f, str) and f for f in fields):
            raise ConfigError(f"text_fields={config['text_fields']!r} is not allowed: expected a list of item "
                              f"field names, e.g. [title, brand, categories]")
        _check_positive_int(config, "text_max_length")
        _check_positive_int(config, "text_batch_size")
        resolve_encoder_path(config["text_encoder_path"])  # a missing encoder fails before anything is computed

    def item_embeddings(self, dataset):
        """F on the model's device and dtype."""
        return item_text_embeddings(self.config, dataset, self.device).to(device=self.device, dtype=self.dtype)

    def text_prior(self, F):
        """C (n x n, zero diagonal) from phase 1, via the d x d Woodbury form."""
        reg_f = float(self.config["reg_weight_f"])
        inner = F.T @ F
        inner.diagonal().add_(reg_f)
        FM = torch.linalg.solve(inner, F.T).T  # F·(λ_F I + FᵀF)⁻¹ (inner is symmetric)
        k_diag = (FM * F).sum(1)
        C = FM @ F.T  # K
        del FM
        C.div_(1.0 - k_diag)  # column j divided by 1 − K_jj
        C.fill_diagonal_(0.0)
        return C

    def _cached_text_prior(self, dataset):
        """C for the config's λ_F. With a sweep's cache, F is encoded once and C is kept for the last λ_F (solve
        only reads C, so the kept one needs no copy)."""
        if self.cache is None:
            return self.text_prior(self.item_embeddings(dataset))
        if "text_embeddings" not in self.cache:
            self.cache["text_embeddings"] = self.item_embeddings(dataset)
        reg_f = float(self.config["reg_weight_f"])
        if self.cache.get("text_prior_reg_f") != reg_f:
            self.cache.pop("text_prior", None)  # the old C goes before the new one allocates
            self.cache["text_prior"] = self.text_prior(self.cache["text_embeddings"])
            self.cache["text_prior_reg_f"] = reg_f
        return self.cache["text_prior"]

    def solve(self, G, dataset):
        lx, le = float(self.config["reg_weight_x"]), float(self.config["reg_weight_e"])
        C = self._cached_text_prior(dataset)

        G.diagonal().add_(lx + le)
        info = torch.empty((), dtype=torch.int32, device=G.device)
        torch.linalg.cholesky_ex(G, out=(G, info))  # in place: G's storage becomes L, then P
        if int(info) != 0:
            raise ConfigError(f"XᵀX + (reg_weight_x + reg_weight_e)·I is not positive definite in "
                              f"{self.config['lae_dtype']} (reg_weight_x={lx}, reg_weight_e={le}): raise "
                              f"reg_weight_x + reg_weight_e or use lae_dtype: float64")
        P = torch.cholesky_inverse(G, out=G)
        p_diag = P.diagonal().clone()

        # diag(P·C)_j = Σ_k P_jk C_kj = Σ_k P_kj C_kj (P symmetric): column sums of P∘C, in row blocks
        pc_diag = torch.zeros_like(p_diag)
        for start in range(0, P.shape[0], ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            pc_diag += (P[rows] * C[rows]).sum(0)

        # B = P·(λ_E·C + diag d), d = −(1 + λ_E·diag(PC)) / diag P (C's diagonal is zero); C is left intact
        d = -(1.0 + le * pc_diag) / p_diag
        for start in range(0, P.shape[0], ROW_BLOCK):  # B overwrites P row block by row block
            rows = slice(start, start + ROW_BLOCK)
            block = P[rows]
            P[rows] = torch.addmm(block * d, block, C, alpha=le)
        return P
