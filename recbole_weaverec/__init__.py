"""recbole-weaverec: LLM-based cross-domain sequential recommenders (WeaveRec, MergeRec) and linear
autoencoders (EASE, RLAE, RDLAE, L3AE) as RecBole models."""
from recbole_weaverec import compat  # noqa: F401  (must run before RecBole is imported)

__version__ = "0.1.0"
