"""Reading a saved run back (``quick_start.load_data_and_model``, RecBole's way to use a saved model again).

Checkpoints written while this package is imported hold the config as a plain dict (``patches``' ``_save_checkpoint``),
so they load with torch's ``weights_only=True`` and nothing is unpickled. Here that dict becomes a ``WeaveConfig`` again
(same model, dataset, data folder and values); ``quick_start.load_data_and_model`` rebuilds the dataset and dataloaders
exactly as ``quick_start.prepare`` builds them (same seeded evaluation users, same shared candidates), builds the model
and loads its saved weights, and ``as_tested`` puts the model in the state the run scored its test split in: LLM
adapters folded into the base weights (merged models re-merged from their saved adapter folders), LAE models with the
validation rows added to the test history where ``test_history: train_valid`` says so. ``patches`` routes RecBole's
own ``load_data_and_model`` to ``quick_start.load_data_and_model``.
"""
import copy
import os
import pickle
import re
from logging import getLogger
from pathlib import Path
from types import SimpleNamespace

import torch

from recbole_weaverec import compat  # noqa: F401  (numpy aliases and safe globals before RecBole / torch.load)
from recbole_weaverec.config import WeaveConfig
from recbole_weaverec.errors import CheckpointError, MissingAdapterError
from recbole_weaverec.model import abstract as hooks

# derived by Config itself from the keys a user sets (fed back they would be taken as user settings and, for
# local_rank, start a process group); "_run_outputs" is quick_start's list of files to remove after a failed run
DERIVED_KEYS = ("MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "valid_metric_bigger", "device", "single_spec",
                "local_rank", "world_size", "nproc", "offset", "ip", "port", "valid_neg_sample_args",
                "test_neg_sample_args", "_run_outputs")
ADAPTER_WEIGHTS = "adapter_config.json"


def read_checkpoint(model_file):
    """The checkpoint dict, loaded with ``weights_only=True`` (never unpickles code)."""
    model_file = str(model_file)
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"checkpoint not found: {model_file}")
    try:
        checkpoint = torch.load(model_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # e.g. RecBole's own checkpoints: a pickled Config object
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the pickled object {found.group(1)}" if found else "pickled objects"
        raise CheckpointError(
            f"checkpoint {model_file} cannot be loaded safely: it holds {what}, which would run code when loaded; "
            f"only checkpoints written while recbole_weaverec is imported (config as a plain dict) reload") from None
    except Exception as e:  # not a torch file at all
        raise CheckpointError(f"{model_file} is not a torch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:120] if str(e) else 'unreadable'})") from None
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "state_dict" not in checkpoint or \
            not all(config.get(k) for k in ("model", "dataset", "data_path")):
        raise CheckpointError(f"{model_file} is not a RecBole model checkpoint (expected a config dict with model, "
                              f"dataset and data_path, and a state_dict)")
    return checkpoint


def saved_config_dict(saved):
    """The saved final config as config_dict values that rebuild the same final config."""
    values = {k: v for k, v in saved.items() if k not in DERIVED_KEYS}
    # RecBole joins data_path with the dataset name; the saved value is the joined folder
    values["data_path"] = os.path.dirname(os.path.normpath(str(saved["data_path"])))
    neg = values.get("train_neg_sample_args")
    if isinstance(neg, dict) and neg.get("distribution") in (None, "none"):
        values["train_neg_sample_args"] = None  # RecBole's "no negatives" form is only valid as its output
    return values


class SavedConfig(WeaveConfig):
    """A ``WeaveConfig`` whose config_dict layer is the saved values, taken as they are: RecBole passes config_dict
    strings through ``eval``, and a checkpoint's strings must never run as code."""

    def __init__(self, model, saved_values, overrides=None):
        self._saved_values = saved_values
        super().__init__(model, saved_values["dataset"], config_dict=overrides)

    def _load_variable_config_dict(self, config_dict):
        return {**copy.deepcopy(self._saved_values), **super()._load_variable_config_dict(config_dict)}


def saved_model_name(checkpoint):
    """The model name to rebuild: ``recbole:NAME`` for RecBole's class of a name this package shadows (EASE)."""
    name = str(checkpoint["config"]["model"])
    module = str(checkpoint.get("model_class", "")).split(":")[0]
    return f"recbole:{name}" if module.startswith("recbole.") else name


def build_saved_config(checkpoint, config_dict=None):
    """A ``WeaveConfig`` equal to the one the checkpoint was written with; ``config_dict`` overrides saved values
    (e.g. ``data_path`` of a moved dataset folder, or ``gpu_id``)."""
    saved = checkpoint["config"]
    config = SavedConfig(saved_model_name(checkpoint), saved_config_dict(saved), dict(config_dict or {}))
    hooks.validate(config)  # as quick_start.build_config: our models check their values before anything runs
    changed = sorted(k for k, v in saved.items() if k not in DERIVED_KEYS and k not in (config_dict or {})
                     and compat.plain_value(config.final_config_dict.get(k)) != v)
    if changed:  # the split or the model would differ from the saved run's
        getLogger().warning(f"reloaded config differs from the saved one in: {', '.join(changed)}")
    return config


def as_tested(model, config, valid_data, model_file):
    """Bring the model into the state in which the saved run scored its test split."""
    from recbole_weaverec.model.llm.base import LLMRecommender

    if isinstance(model, LLMRecommender):
        if type(model).prepare is not LLMRecommender.prepare:  # merged models: nothing trainable in the checkpoint
            _remerge(model, config, valid_data, model_file)
        else:
            model.fold()  # what LLMTrainer does before the final evaluation (merge_and_unload)
    hooks.before_test(model, valid_data)  # as quick_start._run does before the test evaluation


def _remerge(model, config, valid_data, model_file):
    """LLMMerge / WeaveRec: merge the saved run's adapter folders again (never training a missing one)."""
    # the run's trainer: checkpoint_dir is the folder the checkpoint is in, adapters under <checkpoint stem>/
    trainer = SimpleNamespace(logger=getLogger(), checkpoint_dir=str(model_file.parent), config=config,
                              weave_valid_data=valid_data)
    if config["adapter_dir"]:
        root = Path(os.path.expanduser(config["adapter_dir"]))
    elif hasattr(model, "default_adapter_root"):
        root = model.default_adapter_root(trainer.checkpoint_dir)
    else:
        root = model_file.parent / model_file.stem / "adapters"
    model.adapter_root = root
    names = getattr(model, "module_names", None) or [model.target.name, *model.sources]
    for name in names:
        folder = Path(model.adapter_paths.get(name) or root / name)
        if not (folder / ADAPTER_WEIGHTS).is_file():
            raise MissingAdapterError(f"{config['model']} checkpoint {model_file}: adapter {name!r} not found at "
                                      f"{folder} (the merged model is rebuilt from the run's adapter folders)")
    model.prepare(trainer)
