"""The one place that makes RecBole 1.2.1 run on today's numpy / torch. Imported before RecBole.

What it does, and why:
- ``OMP_WAIT_POLICY=PASSIVE`` (if unset) before torch starts its thread pool: on small CPU machines the default
  spin-waiting makes element-wise ops ~15x and LoRA training 4-5x slower.
- numpy 2 removed ``np.float_``, ``np.complex_``, ``np.unicode_`` (RecBole's ``Config.compatibility_settings`` reads
  them to restore ``np.float`` & co., which RecBole's metrics and dataset code still use) and ``np.bool8`` (ray).
  We add them back as aliases of the numpy 2 names; nothing else in numpy changes.
- torch >= 2.6 loads checkpoints with ``weights_only=True``. RecBole's trainer pickles its whole ``Config`` (classes,
  a YAML loader, enums) with pickle protocol 4 into every checkpoint, so reloading the best model fails. We keep safe
  loading on: checkpoints are written with the config as a plain dict of str/number/list values (protocol 2), and the
  few data types that RecBole models keep in ``other_parameter`` (numpy arrays, scipy sparse matrices) are
  allow-listed with ``torch.serialization.add_safe_globals``. Loading a checkpoint never imports or runs model code.
- Loading a checkpoint written for another model raises a one-line error naming both models (RecBole only warns,
  then fails deep inside ``load_state_dict``).
- RecBole's ``load_data_and_model`` cannot read those plain-dict checkpoints: when ``recbole.quick_start`` is imported,
  its ``load_data_and_model`` is replaced by ``recbole_weaverec.reload.load_data_and_model`` (an import hook, so that
  importing this package never imports ``recbole.quick_start``, which imports ray, which needs ``pkg_resources`` from
  setuptools<81, pinned in setup.py for RecBole users' own scripts).
"""
import os
import sys
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# RecBole 1.2.1's pandas idioms warn on pandas 2.x (they work there; pandas 3 is excluded in setup.py)
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")

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


class CheckpointMismatchError(ValueError):
    pass


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


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    if not self.config["single_spec"] and self.config["local_rank"] != 0:
        return
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    state = {
        "config": plain_value(self.config.final_config_dict),
        # which class: our EASE shadows RecBole's EASE (reload.py rebuilds RecBole's as `recbole:EASE`)
        "model_class": f"{type(self.model).__module__}:{type(self.model).__name__}",
        "epoch": epoch,
        "cur_step": self.cur_step,
        "best_valid_score": plain_value(self.best_valid_score),
        "state_dict": self.model.state_dict(),
        "other_parameter": self.model.other_parameter(),
        "optimizer": self.optimizer.state_dict(),
    }
    torch.save(state, saved_model_file)
    if verbose:
        from recbole.utils import set_color

        self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")


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


def _patch_recbole_trainers():
    import scipy.sparse as sp
    from recbole.trainer import trainer as trainer_module

    torch.serialization.add_safe_globals([
        *_numpy_safe_globals(), np.ndarray, np.dtype, np.matrix,
        *{type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")},
        sp.csr_matrix, sp.csc_matrix, sp.coo_matrix,
    ])
    Trainer = trainer_module.Trainer
    Trainer._save_checkpoint = _save_checkpoint
    original_evaluate = Trainer.evaluate
    original_resume = Trainer.resume_checkpoint

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            check_checkpoint_model(model_file or self.saved_model_file, self.config["model"])
        return original_evaluate(self, eval_data, load_best_model, model_file, show_progress)

    def resume_checkpoint(self, resume_file):
        check_checkpoint_model(str(resume_file), self.config["model"])
        return original_resume(self, resume_file)

    Trainer.evaluate = evaluate
    Trainer.resume_checkpoint = resume_checkpoint


_patch_recbole_trainers()


class _PatchAfterExec:
    """Loader wrapper: runs the real loader, then patches the module (everything else goes to the real loader)."""

    def __init__(self, loader, patch):
        self._loader, self._patch = loader, patch

    def __getattr__(self, name):
        if name == "_loader":  # not set yet (e.g. while being copied): no recursion
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


class _QuickStartHook:
    """Meta-path finder that patches ``recbole.quick_start`` when (and only if) someone imports it."""

    name = "recbole.quick_start"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchAfterExec(spec.loader, _patch_quick_start)
        return spec


def _patch_quick_start(package):
    from recbole_weaverec.reload import load_data_and_model

    package.load_data_and_model = load_data_and_model  # `from recbole.quick_start import load_data_and_model`
    package.quick_start.load_data_and_model = load_data_and_model


# ray 2.6 (imported by recbole.quick_start) imports pkg_resources, which setuptools 80 marks deprecated
warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
if _QuickStartHook.name in sys.modules:  # imported before this package
    _patch_quick_start(sys.modules[_QuickStartHook.name])
elif not any(isinstance(f, _QuickStartHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuickStartHook())

# multi-process runs (RecBole's nproc/world_size keys): DDP on CPU, exact gathered evaluation, rank-0-only output
from recbole_weaverec.distributed import patch_recbole_trainers  # noqa: E402

patch_recbole_trainers()
