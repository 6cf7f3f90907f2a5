"""Every change this package makes to RecBole's Trainer (and the hook on ``recbole.quick_start``), in one place.

``install()`` runs once, from the package's ``__init__`` (after ``compat``, which only adapts numpy / scipy / torch,
and before ``safe.install()``, the other patch module: RecBole's Config value parsing, YAML loading and dataset /
dataloader loading, so that nothing a user controls is unpickled or evaluated). Each method is replaced or wrapped
exactly once; the function installed keeps RecBole's original as ``__wrapped__``. In install order:

1. ``AbstractTrainer.__init__`` (replaced): in a multi-process run, RecBole's DDP wrapper needs a GPU per process;
   here DDP has no ``device_ids`` on CPU (``distributed.make_ddp``), none at all for a trainer that all-reduces its
   own gradients (``manual_gradient_sync``) or a model with nothing to train, and SyncBatchNorm only on CUDA.
2. ``recbole.trainer.trainer.get_tensorboard`` (wrapped): TensorBoard files from global rank 0 only.
3. ``Trainer.__init__`` (wrapped): RecBole names the checkpoint by each process's clock; every rank takes rank 0's.
4. ``Trainer._save_checkpoint`` (replaced): RecBole pickles its whole Config, which torch's ``weights_only`` loader
   refuses; the checkpoint holds the config as a plain dict (``compat.plain_value``) and names the model class
   (our EASE shadows RecBole's). Written by global rank 0 only; the other ranks wait until it is on disk.
5. ``Trainer.resume_checkpoint`` (wrapped): a checkpoint written for another model is refused in one line naming
   both (``compat.check_checkpoint_model``; RecBole only warns, then fails inside ``load_state_dict``).
6. ``Trainer.evaluate`` (wrapped): the same check before the best model is loaded. In a multi-process run every
   rank's per-sample rows are gathered (``distributed.GatheringEvaluator``), so the metrics are those one process
   would compute, not an average of rounded per-rank metrics that count the DistributedSampler's padded repeats.
7. ``Trainer._map_reduce`` (wrapped): RecBole's per-rank averaging is skipped for those gathered metrics.
8. ``recbole.quick_start.load_data_and_model`` (an import hook, so that importing this package never imports
   ``recbole.quick_start``, which imports ray): RecBole's function cannot read the plain-dict checkpoints, so it is
   ``quick_start.load_data_and_model``.
9. ``Pop.calculate_loss`` (replaced; ``Pop.__init__`` wrapped to keep the label field): RecBole's indexed
   assignment counts an item once per batch, and counts the sampled negatives of pointwise batches; here every
   positive training interaction counts once (``index_add_``).
10. ``recbole.trainer.hyper_tuning.exhaustive_search`` (replaced): RecBole samples with a ``RandomState``, which has
   no ``integers``; hyperopt >= 0.2.7 draws every ``choice`` with ``rng.integers``, so ``HyperTuning(...,
   algo="exhaustive")`` (its default) failed on the first trial. Here with a ``Generator``, otherwise as RecBole.
   (``safe.install()`` replaces ``HyperTuning._build_space_from_file``: ``choice`` lists are literals, never eval'd.)
"""
import importlib.machinery
import sys

import torch

from recbole_weaverec.compat import check_checkpoint_model, plain_value  # (and numpy's aliases before RecBole)
from recbole.trainer import trainer as trainer_module
from recbole.utils import set_color

from recbole_weaverec.distributed import GatheringEvaluator, barrier, broadcast_object, is_main, make_ddp


# --- the Trainer ------------------------------------------------------------------------------------------------
def _abstract_trainer_init(self, config, model):
    self.config = config
    self.model = model
    if not config["single_spec"]:
        # (no SyncBatchNorm on CPU: it needs a GPU; our models have no BatchNorm)
        if config["device"].type == "cuda":
            self.model = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.distributed_model = make_ddp(self, model, config)


class _NullWriter:
    """Stands in for TensorBoard's SummaryWriter on ranks other than 0 (no event files)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def _get_tensorboard(log):
    return _get_tensorboard.__wrapped__(log) if is_main() else _NullWriter()


def _trainer_init(self, config, model):
    _trainer_init.__wrapped__(self, config, model)
    if not config["single_spec"]:  # RecBole names the checkpoint by each process's clock: take rank 0's
        self.saved_model_file = broadcast_object(self.saved_model_file)


def _save_checkpoint(self, epoch, verbose=True, **kwargs):
    saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
    if self.config["single_spec"] or is_main():
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
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")
    if not self.config["single_spec"]:
        barrier()  # every rank calls this at the same point; none reads the file before it is written


def _resume_checkpoint(self, resume_file):
    check_checkpoint_model(str(resume_file), self.config["model"])
    return _resume_checkpoint.__wrapped__(self, resume_file)


def _evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
    recbole_evaluate = _evaluate.__wrapped__
    if eval_data and load_best_model:
        check_checkpoint_model(model_file or self.saved_model_file, self.config["model"])
    if self.config["single_spec"] or not eval_data or isinstance(self.evaluator, GatheringEvaluator):
        return recbole_evaluate(self, eval_data, load_best_model, model_file, show_progress)
    self.evaluator = GatheringEvaluator(self.evaluator, list(iter(eval_data.sampler)))
    try:
        return recbole_evaluate(self, eval_data, load_best_model, model_file, show_progress)
    finally:
        self.evaluator = self.evaluator.evaluator


def _map_reduce(self, result, num_sample):
    if isinstance(self.evaluator, GatheringEvaluator) and self.evaluator.exact:
        return result  # already the metrics of all samples
    return _map_reduce.__wrapped__(self, result, num_sample)


def install_trainer_patches():
    AbstractTrainer, Trainer = trainer_module.AbstractTrainer, trainer_module.Trainer
    if vars(Trainer)["evaluate"] is _evaluate:
        return  # installed already: wrapping twice would check and gather twice
    for owner, name, new in ((AbstractTrainer, "__init__", _abstract_trainer_init),
                             (trainer_module, "get_tensorboard", _get_tensorboard),
                             (Trainer, "__init__", _trainer_init),
                             (Trainer, "_save_checkpoint", _save_checkpoint),
                             (Trainer, "resume_checkpoint", _resume_checkpoint),
                             (Trainer, "evaluate", _evaluate),
                             (Trainer, "_map_reduce", _map_reduce)):
        new.__wrapped__ = vars(owner)[name]  # RecBole's own function (never an inherited one)
        setattr(owner, name, new)


# --- recbole.quick_start ----------------------------------------------------------------------------------------
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
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchAfterExec(spec.loader, _patch_quick_start)
        return spec


def _patch_quick_start(package):
    # imported here: quick_start imports RecBole's data pipeline, which a plain `import recbole_weaverec` skips
    from recbole_weaverec.quick_start import load_data_and_model

    package.load_data_and_model = load_data_and_model  # `from recbole.quick_start import load_data_and_model`
    package.quick_start.load_data_and_model = load_data_and_model


def install_quick_start_hook():
    if _QuickStartHook.name in sys.modules:  # imported before this package
        _patch_quick_start(sys.modules[_QuickStartHook.name])
    elif not any(isinstance(f, _QuickStartHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuickStartHook())


# --- recbole.model.general_recommender.pop ------------------------------------------------------------------------
def _pop_init(self, config, dataset):
    _pop_init.__wrapped__(self, config, dataset)
    self.label_field = config["LABEL_FIELD"]


def _pop_calculate_loss(self, interaction):
    """Every positive training interaction counted once. RecBole's ``item_cnt[item] = item_cnt[item] + 1`` is an
    indexed assignment: an item appearing several times in one batch is counted once, so with large batches Pop
    ranks items by the number of batches they appear in; and the sampled negatives of a pointwise batch (label 0)
    were counted as interactions."""
    item = interaction[self.ITEM_ID]
    if self.label_field in interaction.interaction:
        item = item[interaction[self.label_field] > 0]
    self.item_cnt.index_add_(0, item, torch.ones(len(item), 1, dtype=self.item_cnt.dtype, device=item.device))
    self.max_cnt = torch.max(self.item_cnt, dim=0)[0]
    return torch.nn.Parameter(torch.zeros(1)).to(self.device)


def install_pop_patch():
    from recbole.model.general_recommender.pop import Pop

    if vars(Pop)["calculate_loss"] is not _pop_calculate_loss:
        for name, new in (("__init__", _pop_init), ("calculate_loss", _pop_calculate_loss)):
            new.__wrapped__ = vars(Pop)[name]
            setattr(Pop, name, new)


# --- recbole.trainer.hyper_tuning --------------------------------------------------------------------------------
def _exhaustive_search(new_ids, domain, trials, seed, nbMaxSucessiveFailures=1000):
    """RecBole's ``exhaustive_search``: a sample not tried yet per new trial, none once ``nbMaxSucessiveFailures``
    draws in a row were all tried (the space is exhausted); drawn with the ``Generator`` hyperopt expects."""
    import numpy as np
    from hyperopt import pyll
    from hyperopt.base import miscs_update_idxs_vals

    def point(vals):
        return frozenset((key, value[0] if len(value) > 0 else None) for key, value in vals.items())

    tried = {point(trial["misc"]["vals"]) for trial in trials.trials}
    rng = np.random.default_rng(seed)
    docs = []
    for new_id in new_ids:
        for _ in range(nbMaxSucessiveFailures + 1):
            idxs, vals = pyll.rec_eval(domain.s_idxs_vals, memo={domain.s_new_ids: [new_id], domain.s_rng: rng})
            if point(vals) not in tried:
                break
        else:
            return []
        misc = dict(tid=new_id, cmd=domain.cmd, workdir=domain.workdir)
        miscs_update_idxs_vals([misc], idxs, vals)
        docs.extend(trials.new_trial_docs([new_id], [None], [domain.new_result()], [misc]))
    return docs


def install_hyper_tuning_patch():
    from recbole.trainer import hyper_tuning

    if hyper_tuning.exhaustive_search is not _exhaustive_search:
        _exhaustive_search.__wrapped__ = hyper_tuning.exhaustive_search
        hyper_tuning.exhaustive_search = _exhaustive_search  # HyperTuning.__init__ looks the name up here


def install():
    install_trainer_patches()
    install_quick_start_hook()
    install_pop_patch()
    install_hyper_tuning_patch()
