"""``run(model, dataset, config_file_list, config_dict)``: RecBole's run_recbole for our models and RecBole's
(``spawn``: its multi-process runs), and ``load_data_and_model`` to use a saved run again, as in RecBole's
quick_start, and ``objective_function`` for RecBole's ``HyperTuning``."""
import glob
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from logging import getLogger

from recbole_weaverec import compat  # noqa: F401
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_trainer, init_seed, set_color

from recbole_weaverec.config import ConfigError, WeaveConfig
from recbole_weaverec.data.checks import check_dataset_files
from recbole_weaverec.distributed import check_launch, is_main
from recbole_weaverec.distributed import init_logger as init_rank_logger  # log file on rank 0 only
from recbole_weaverec.model import abstract as hooks
from recbole_weaverec.reload import as_tested, build_saved_config, read_checkpoint
from recbole_weaverec.runfiles import JournaledList, RunFiles, sigterm_as_exit
from recbole_weaverec.stats import per_user_metrics, recording_per_user

FULL_SORT_USERS_PER_BATCH = 256
DEFAULT_MODEL = "WeaveRec"  # the README's main job: WeaveRec on toys-sample with beauty-sample as source


def build_config(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None):
    config = WeaveConfig(model=model, dataset=dataset, config_file_list=config_file_list,
                         config_dict=config_dict, cmd_args=cmd_args)
    hooks.validate(config)  # our models check their hyperparameters before anything is written
    return config


def get_trainer_class(config, model_class):
    """A model may name its own trainer (a subclass of RecBole's); otherwise RecBole picks one by model type."""
    return hooks.trainer_class(model_class) or get_trainer(config["MODEL_TYPE"], config["model"])


def _size_eval_batch(config, dataset):
    # only a user's own setting counts: RecBole's overall.yaml always puts 4096 into the internal layer
    modes = set(config["eval_args"]["mode"].values())
    if "eval_batch_size" not in config.external_config_dict and "full" in modes:
        config["eval_batch_size"] = max(4096, FULL_SORT_USERS_PER_BATCH * dataset.item_num)


def _eval_sample_seed(config):
    """The seed of the evaluation users: ``eval_sample_seed`` (a leaderboard sets its ``sample_seed``, so every
    training seed scores the same users), or the training ``seed`` when it is null."""
    seed = config["eval_sample_seed"] if "eval_sample_seed" in config else None
    if seed is None:
        return config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"eval_sample_seed={seed!r} is not allowed: expected an integer from 0 to {2**32 - 1} "
                          f"or null (use seed)")
    return seed


def _sample_eval_users(config, dataset):
    """``eval_sample_users: N`` keeps N users (the same for every model) in the valid and test splits, drawn with
    ``eval_sample_seed`` (null: the training ``seed``)."""
    seed = _eval_sample_seed(config)  # checked even without eval_sample_users: a bad value is never silently unused
    n = config["eval_sample_users"] if "eval_sample_users" in config else None
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"eval_sample_users={n!r} is not allowed: expected a positive integer or null (all users)")
    build = dataset.build

    def build_with_sampled_users():
        train, valid, test = build()
        uid = dataset.uid_field
        users = np.unique(test.inter_feat[uid].numpy())
        if n < len(users):
            users = np.sort(np.random.default_rng(seed).choice(users, n, replace=False))
        keep = [d.copy(d.inter_feat[torch.from_numpy(np.isin(d.inter_feat[uid].numpy(), users))])
                for d in (valid, test)]
        return [train, *keep]

    dataset.build = build_with_sampled_users


class SharedCandidateSampler:
    """Evaluation negatives that depend only on (seed, phase, user): identical for every model and batch size.

    RecBole draws evaluation negatives from numpy's global RNG while batches are collated, and excludes a different
    "used" set for general and sequential models (the first item of a sequence is never a training target), so two
    models would score different candidate lists. Here each user's ``num`` negatives are drawn without replacement
    from the items the user never interacted with (in any split), with a generator seeded by (seed, phase, user):
    the uni29 protocol of WeaveRec (true next item + 29 random non-interacted items) for every model alike.
    """

    def __init__(self, sampler, user_items, n_items, seed, phase):
        self._sampler = sampler
        self._user_items = user_items  # csr users x items of the whole dataset
        self._n_items = n_items
        self._seed = int(seed) * 10 + {"valid": 1, "test": 2}.get(phase, 0)

    def __getattr__(self, name):
        return getattr(self._sampler, name)

    def _negatives(self, user, num):
        used = self._user_items.indices[self._user_items.indptr[user]:self._user_items.indptr[user + 1]]
        pool = np.setdiff1d(np.arange(1, self._n_items), used, assume_unique=True)
        rng = np.random.default_rng([self._seed, int(user)])
        return rng.choice(pool, size=min(num, len(pool)), replace=False) if len(pool) >= num \
            else rng.choice(pool, size=num, replace=True)

    def sample_by_user_ids(self, user_ids, item_ids, num):
        user_ids = np.asarray(user_ids)
        neg = np.stack([self._negatives(u, num) for u in user_ids], axis=1)  # num x len(user_ids)
        return torch.from_numpy(neg.reshape(-1).astype(np.int64))  # RecBole's layout: item k*len+j for user j


def prepare(config):
    """Seeded dataset + RecBole's split and dataloaders (uniform evaluation candidates shared by all models)."""
    init_seed(config["seed"], config["reproducibility"])
    check_dataset_files(config)  # a broken atomic file: one line naming file and line, before RecBole reads it
    dataset = create_dataset(config)
    _size_eval_batch(config, dataset)
    _sample_eval_users(config, dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    user_items = None
    for phase, data in (("valid", valid_data), ("test", test_data)):
        if config[f"{phase}_neg_sample_args"]["distribution"] == "uniform" and \
                config[f"{phase}_neg_sample_args"]["sample_num"] != "none":
            if user_items is None:
                user_items = dataset.inter_matrix(form="csr")
                user_items.sort_indices()
            data._sampler = SharedCandidateSampler(data._sampler, user_items, dataset.item_num, config["seed"], phase)
    return dataset, train_data, valid_data, test_data


def run(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True, cmd_args=None,
        nproc=1, world_size=-1, ip="localhost", port="5678", group_offset=0, per_user=False):
    """Train and evaluate like ``recbole.quick_start.run_recbole``; returns the same dict.

    ``model`` is a name (ours, RecBole's, or ``recbole:NAME`` for RecBole's) or a class. ``nproc``/``world_size``/
    ``ip``/``port``/``group_offset`` are RecBole's ``run`` arguments: ``nproc`` > 1 (or ``world_size`` > 0) spawns
    data-parallel processes (see ``distributed``) and returns global rank 0's dict. ``per_user=True`` (one process
    only) adds ``test_per_user``: {"users": [user tokens], "metrics": {"ndcg@10": values per user, ...}}, taken from
    the test evaluation's own scores through RecBole's metric classes (``stats.recording_per_user``).
    """
    if per_user and (nproc != 1 or world_size > 0):
        raise ValueError(f"per_user=True needs a single-process run, got nproc={nproc!r}, world_size={world_size!r}")
    if nproc != 1 or world_size > 0:
        world = check_launch(nproc, world_size, group_offset)
        build_config(model, dataset, config_file_list, config_dict, cmd_args)  # bad input: one line, before spawning
        return spawn(dict(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict,
                          saved=saved, cmd_args=cmd_args), nproc, world, ip, port, group_offset)
    config = build_config(model, dataset, config_file_list, config_dict, cmd_args)
    with sigterm_as_exit():  # SIGTERM (timeout, Slurm, docker stop) cleans up exactly as Ctrl-C does
        files = RunFiles()  # also removes the files of runs here that were killed outright
        new_logs = []
        try:
            before = set(glob.glob("log/**/*.log", recursive=True))
            init_rank_logger(config)
            # RecBole creates the file even where logging.basicConfig then ignores it (handlers already set)
            new_logs = sorted(set(glob.glob("log/**/*.log", recursive=True)) - before)
            for log_file in new_logs:
                files.add_log_file(log_file)
            config.final_config_dict["_run_outputs"] = JournaledList(
                files, config.final_config_dict.get("_run_outputs", []))
            result = _run(config, saved, per_user)
        except BaseException:
            _close_log_files(new_logs)
            files.discard(config.final_config_dict.get("_run_outputs", []))
            raise
        files.finished()
        return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """RecBole's ``objective_function`` for ``recbole.trainer.HyperTuning``, for every model ``run`` knows (ours,
    RecBole's, ``recbole:NAME``): ``HyperTuning(objective_function, params_file=..., fixed_config_file_list=[...])``.

    As in RecBole, the model and dataset come from ``config_dict`` (a trial's parameters) or the config files.
    """
    # the name RecBole reports (a class name: `recbole:EASE` -> EASE); also refuses bad input before anything is run
    model = build_config(config_file_list=config_file_list, config_dict=config_dict)["model"]
    root, log_dir = logging.getLogger(), os.path.abspath("log") + os.sep
    for handler in root.handlers[:]:  # as RecBole's objective: each trial logs to its own file, not the first's
        root.removeHandler(handler)
        if isinstance(handler, logging.FileHandler) and handler.baseFilename.startswith(log_dir):
            handler.close()  # RecBole's log file of the previous trial (a user's own handlers stay open)
    return {"model": model, **run(config_file_list=config_file_list, config_dict=config_dict, saved=saved)}


def _close_log_files(log_files):
    """The failed run's log file handler is closed before the file is removed (RecBole keeps it open)."""
    log_files = {os.path.abspath(p) for p in log_files}
    for handler in list(logging.getLogger().handlers):
        if isinstance(handler, logging.FileHandler) and handler.baseFilename in log_files:
            handler.close()
            logging.getLogger().removeHandler(handler)


def _run(config, saved, per_user=False):
    logger = getLogger()
    logger.info(config)

    dataset, train_data, valid_data, test_data = prepare(config)
    logger.info(dataset)

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train_data._dataset).to(config["device"])
    logger.info(model)

    boards_before = set(glob.glob("log_tensorboard/*"))
    try:
        trainer = get_trainer_class(config, config.model_class)(config, model)
    finally:  # RecBole's Trainer makes its TensorBoard folder first, then the checkpoint folder (which may fail)
        config.final_config_dict["_run_outputs"].extend(sorted(set(glob.glob("log_tensorboard/*")) - boards_before))
    config.final_config_dict["_run_outputs"].append(trainer.saved_model_file)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"])
    hooks.before_test(model, valid_data)  # e.g. LAE models that add the validation rows to the test history
    with recording_per_user(trainer) if per_user else nullcontext([]) as evaluations:
        test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    config.final_config_dict["_run_outputs"] = []  # finished: keep everything (the journal is deleted by run())
    result = {
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        **hooks.extra_results(model),  # e.g. WeaveRec's target_only_test_result
    }
    if per_user:  # the test evaluation's own scores, per user (its first evaluation: WeaveRec adds comparisons)
        users, values = evaluations[0] if evaluations and evaluations[0][0] is not None else \
            per_user_metrics(trainer, test_data)  # a trainer whose evaluate bypasses RecBole's batch functions
        # tokens, not internal ids: another model's dataset (e.g. merged domains) may number the users differently
        tokens = test_data._dataset.id2token(config["USER_ID_FIELD"], users)
        result["test_per_user"] = {"users": [str(t) for t in tokens], "metrics": values}
    return result


def spawn(run_kwargs, nproc, world, ip, port, group_offset):
    """``run(**run_kwargs)`` in ``nproc`` local processes of a ``world``-process job (like RecBole's
    ``run_recboles``); returns global rank 0's result (None on the other machines)."""
    import torch.multiprocessing as mp

    config_dict = dict(run_kwargs.get("config_dict") or {})
    config_dict.update({"world_size": world, "ip": str(ip), "port": str(port), "nproc": nproc,
                        "offset": group_offset})
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=({**run_kwargs, "config_dict": config_dict}, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _worker(local_rank, run_kwargs, queue):
    run_kwargs["config_dict"] = {**run_kwargs["config_dict"], "local_rank": local_rank}
    try:
        result = run(**run_kwargs)
        if is_main():
            queue.put(result)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def load_data_and_model(model_file, config_dict=None):
    """``(config, model, dataset, train_data, valid_data, test_data)`` of a saved run, like RecBole's function.

    ``trainer.evaluate(test_data, load_best_model=False)`` with the model's trainer (``get_trainer_class``) then
    reproduces the saved run's test result. RecBole's own ``load_data_and_model`` is routed here (``patches``).
    """
    checkpoint = read_checkpoint(model_file)
    config = build_saved_config(checkpoint, config_dict)
    dataset, train_data, valid_data, test_data = prepare(config)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])  # as _run
    model = config.model_class(config, train_data._dataset).to(config["device"])
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    as_tested(model, config, valid_data, Path(model_file))
    model.eval()
    return config, model, dataset, train_data, valid_data, test_data
