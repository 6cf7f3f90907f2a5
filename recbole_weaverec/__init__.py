"""recbole-weaverec: LLM-based cross-domain sequential recommenders (WeaveRec, MergeRec) and linear
autoencoders (EASE, RLAE, RDLAE, L3AE) as RecBole models."""
from recbole_weaverec import compat  # noqa: F401  (must run before RecBole is imported)
from recbole_weaverec import patches as _patches  # noqa: E402
from recbole_weaverec import safe as _safe  # noqa: E402

_patches.install()  # RecBole's Trainer and quick_start: each change once, in the order patches.py documents
_safe.install()  # no pickle.load / eval() of anything a user, a config or a file controls

__version__ = "0.1.0"
