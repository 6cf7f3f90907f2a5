"""The one place that makes RecBole 1.2.1 run on today's numpy / scipy / torch. Imported before RecBole; imports
nothing of this package. (Changes to RecBole's own code are in ``patches``, Trainer and quick_start, and ``safe``,
Config and data loading.)

What it does, and why:
- ``OMP_WAIT_POLICY=PASSIVE`` (if unset) before torch starts its thread pool: on small CPU machines the default
  spin-waiting makes element-wise ops ~15x and LoRA training 4-5x slower.
- ``ONEDNN_PRIMITIVE_CACHE_CAPACITY=64`` (if unset): oneDNN keeps up to 1024 compiled matmul primitives, one per
  shape, with their reordered bf16 weights; length-bucketed LoRA training makes hundreds of shapes. Capped at 64
  the main job peaks at 2.47 instead of 2.93 GiB and runs no slower (benchmarks/RESULTS.md, "Main job").
- ``release_memory()``: glibc keeps freed heap pages of a training run mapped; giving them back between LoRA
  modules keeps the next module's peak from stacking on the last one's (Linux/glibc only; a no-op elsewhere).
- numpy 2 removed ``np.float_``, ``np.complex_``, ``np.unicode_`` (RecBole's ``Config.compatibility_settings`` reads
  them to restore ``np.float`` & co., which RecBole's metrics and dataset code still use) and ``np.bool8`` (ray).
  We add them back as aliases of the numpy 2 names; nothing else in numpy changes.
- scipy >= 1.12 removed ``dok_matrix._update``, which RecBole's graph models call; it is added back.
- torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole's trainer pickles its whole ``Config`` (classes,
  a YAML loader, enums) into every checkpoint, so reloading the best model fails. We keep safe loading on: the
  checkpoints ``patches`` writes hold the config as a plain dict (``plain_value``), and the few data types that
  RecBole models keep in ``other_parameter`` (numpy arrays, scipy sparse matrices) are allow-listed here with
  ``torch.serialization.add_safe_globals``. Loading a checkpoint never imports or runs model code.
- ``check_checkpoint_model``: loading a checkpoint written for another model raises a one-line error naming both
  models (RecBole only warns, then fails deep inside ``load_state_dict``).
"""
import os
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")  # read when oneDNN first runs, i.e. after this
# RecBole 1.2.1's pandas idioms warn on pandas 2.x (they work there; pandas 3 is excluded in setup.py)
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")
# ray 2.6 (imported by recbole.quick_start) imports pkg_resources, which setuptools 80 marks deprecated
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)

import numpy as np  # noqa: E402

_NUMPY_ALIASES = {
    "float_": np.float64,
    "complex_": np.complex128,
    "unicode_": np.str_,
    "bool8": np.bool_,
    "int_": np.int64,
}
for _name, _alias in _NUMPY_ALIASES.items():
    if not hasattr(np, _name):
        setattr(np, _name, _alias)
# RecBole uses these removed aliases in module bodies that run before any Config exists (e.g. metrics).
for _name, _alias in {"float": float, "int": int, "bool": bool, "long": np.int64, "object": object,
                      "str": str, "complex": complex, "unicode": str}.items():
    if _name not in np.__dict__:
        setattr(np, _name, _alias)

# RecBole's graph models (LightGCN, NGCF, GCMC, NCL, SpectralCF) fill their adjacency with dok_matrix._update, which
# scipy >= 1.12 removed; its storage is the dict `_dict` there.
import scipy.sparse as _sp  # noqa: E402

if not hasattr(_sp.dok_matrix, "_update"):
    def _dok_update(self, data):
        self._dict.update(data)

    _sp.dok_matrix._update = _dok_update

import torch  # noqa: E402

from recbole_weaverec.errors import CheckpointMismatchError  # noqa: E402


def release_memory():
    """Collect garbage and return the heap's free pages to the system (glibc ``malloc_trim``); False where the C
    library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        if name:
            ctypes.CDLL(name).malloc_trim(0)  # returns 1 if pages were released, 0 if there were none
        return bool(name)
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return False


def plain_value(value):
    """Config value -> something torch's safe loader accepts (str / number / bool / None / list / dict)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple, set)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def check_checkpoint_model(checkpoint_file, model_name):
    """Refuse a checkpoint written for another model (one line naming both)."""
    saved = torch.load(checkpoint_file, map_location="cpu")["config"]["model"]
    if str(saved).lower() != str(model_name).lower():
        raise CheckpointMismatchError(
            f"checkpoint {checkpoint_file} was saved by model {saved!r}, not {model_name!r}")


def _numpy_safe_globals():
    """numpy's pickle helpers under the names of both numpy 1.x (``numpy.core``) and 2.x (``numpy._core``), so a
    checkpoint written under either loads under both."""
    numpy2 = int(np.__version__.split(".")[0]) >= 2
    multiarray = np._core.multiarray if numpy2 else np.core.multiarray
    out = [multiarray._reconstruct, multiarray.scalar]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    return out


# the types RecBole models keep in other_parameter, for torch's weights_only loader
torch.serialization.add_safe_globals([
    *_numpy_safe_globals(), np.ndarray, np.dtype, np.matrix,
    *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")},
    _sp.csr_matrix, _sp.csc_matrix, _sp.coo_matrix,
])
