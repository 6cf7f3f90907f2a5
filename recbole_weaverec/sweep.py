"""Closed-form hyperparameter sweeps (issue 18.3): ``sweep(model, dataset, grid)`` scores every point of ``grid``
(a list of {key: value} dicts over the model's ``sweep_keys``) on one config, one dataset and split and one model.

The Gram matrix G (and L3AE's item text embeddings, and its text prior while λ_F stays the same) is computed once;
each point only solves B again and evaluates the validation and test splits through RecBole's Trainer as
``quick_start.run`` does (same candidates, tie-break and test history), so every row equals a separate run with
``config_dict={**config_dict, **point}``. A point's keys that it does not name keep ``config_dict``'s values.
"""
import glob
import shutil
import time

import numpy as np
from recbole.utils import init_seed

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.model import abstract as hooks
from recbole_weaverec.model.lae.base import LinearAutoencoder
from recbole_weaverec.quick_start import build_config, get_trainer_class, prepare
from recbole_weaverec.registry import get_model_class

SWEEPABLE = ("EASE", "RLAE", "RDLAE", "L3AE")


def log_grid(low, high, k):
    """``k`` values from ``low`` to ``high`` (both included), evenly spaced on a log scale."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} is not allowed: expected an integer >= 1")
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{name}={value!r} is not allowed: expected a number > 0 (a log grid)")
    if high < low:
        raise ConfigError(f"high={high!r} is not allowed: expected high >= low={low!r}")
    return [float(v) for v in np.geomspace(low, high, k)]


def _model_class(model_name):
    if not isinstance(model_name, str) or model_name not in SWEEPABLE:
        raise ConfigError(f"model={model_name!r} is not allowed for a sweep: expected one of {', '.join(SWEEPABLE)}")
    cls = get_model_class(model_name)
    assert issubclass(cls, LinearAutoencoder), cls  # SWEEPABLE names only the closed-form models
    return cls


def _check_grid(cls, grid):
    if not isinstance(grid, (list, tuple)) or not grid or not all(isinstance(p, dict) for p in grid):
        raise ConfigError(f"grid={grid!r} is not allowed: expected a non-empty list of {{parameter: value}} dicts, "
                          f"parameters of {cls.__name__}: {', '.join(cls.sweep_keys)}")
    for point in grid:
        for key in point:
            if key not in cls.sweep_keys:
                raise ConfigError(f"sweep parameter {key!r} is not allowed for {cls.__name__}: expected one of "
                                  f"{', '.join(cls.sweep_keys)}")


def _check_candidates(config):
    # RecBole draws popularity-sampled candidates from the global RNG while batches are collated, so they depend
    # on everything a run did before; uniform ones come from SharedCandidateSampler (seeded per user)
    for phase in ("valid", "test"):
        args = config[f"{phase}_neg_sample_args"]
        if args["sample_num"] != "none" and args["distribution"] != "uniform":
            raise ConfigError(f"eval_args mode {config['eval_args']['mode'][phase]!r} ({phase}) is not allowed for "
                              f"a sweep: expected full or uni<N> (candidates identical to a separate run's)")


def _apply(config, base, point):
    """The config of one point: its keys over ``base`` (the values before the sweep)."""
    for key, value in base.items():
        config[key] = point.get(key, value)


def _floats(result):
    return {k: float(v) for k, v in result.items()}


def sweep(model_name, dataset_name, grid, config_dict=None, config_file_list=None):
    """One row per point of ``grid``: {"params": point, "valid": metrics, "test": metrics, "seconds": its solve and
    both evaluations (the first row's also building G and, for L3AE, the text embeddings)}. Bad input (model,
    parameter name or value, popularity-sampled candidates) raises ``ConfigError`` in one line before anything is
    loaded."""
    cls = _model_class(model_name)
    _check_grid(cls, grid)
    config = build_config(model_name, dataset_name, config_file_list, config_dict)
    _check_candidates(config)
    base = {key: config[key] for key in cls.sweep_keys}
    for point in grid:  # every value is checked before the dataset is loaded
        _apply(config, base, point)
        cls.validate_config(config)
    _apply(config, base, grid[0])

    _, train_data, valid_data, test_data = prepare(config)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as quick_start's _run
    start = time.perf_counter()
    model = cls(config, train_data._dataset, cache={}).to(config["device"])
    boards_before = set(glob.glob("log_tensorboard/*"))
    trainer = get_trainer_class(config, cls)(config, model)
    trainer.tensorboard.close()  # a sweep writes no scalars: RecBole's Trainer made the folder anyway
    for board in sorted(set(glob.glob("log_tensorboard/*")) - boards_before):
        shutil.rmtree(board, ignore_errors=True)
    trainer.eval_collector.data_collect(train_data)  # what Trainer.fit collects before its validation
    rows = []
    for i, point in enumerate(grid):
        if i:
            start = time.perf_counter()
            _apply(config, base, point)
            model.refit(train_data._dataset)
        valid = trainer.evaluate(valid_data, load_best_model=False, show_progress=config["show_progress"])
        hooks.before_test(model, valid_data)
        test = trainer.evaluate(test_data, load_best_model=False, show_progress=config["show_progress"])
        rows.append({"params": dict(point), "valid": _floats(valid), "test": _floats(test),
                     "seconds": time.perf_counter() - start})
    return rows
