"""The hooks a model of this package may add to RecBole's four methods (``__init__``, ``calculate_loss``, ``predict``,
``full_sort_predict``), documented once. Every family's base class inherits ``ModelHooks`` (its defaults do
nothing); quick_start, reload and the leaderboard call the hooks through the functions below, which also accept
RecBole's own models (they have none of them).

Family-specific protocol, documented with its family: the LLM models' ``prepare(trainer)`` (train or reuse adapters,
then merge/fold) and ``adapter_root`` (set by ``LLMTrainer``) in ``model/llm/base.py``; a model that writes files of
its own appends them to ``config['_run_outputs']`` so that a failed or interrupted run removes them (runfiles.py).
"""


class ModelHooks:
    trainer_class = None
    """A RecBole Trainer subclass for this model; None: RecBole picks one by model type."""

    extra_results = None
    """Set during the final evaluation: a dict merged into ``run()``'s result (e.g. WeaveRec's
    ``target_only_test_result``, MergeRec's per-domain results)."""

    @classmethod
    def validate_config(cls, config):
        """Check this model's keys before anything is built, trained or written; raise ``errors.ConfigError`` with
        one line naming the key, the value and what is allowed. May fill in a default (e.g. sample sources)."""

    def before_test(self, valid_data):
        """Called after ``fit`` and before the test evaluation (and by reload, to score as the run did); e.g. the
        linear autoencoders add the validation rows to the test users' history."""


def validate(config):
    """``config.model_class.validate_config(config)`` where the model has it."""
    check = getattr(config.model_class, "validate_config", None)
    if check is not None:
        check(config)


def trainer_class(model_class):
    """The model's own trainer class, or None for RecBole's choice by model type."""
    return getattr(model_class, "trainer_class", None)


def before_test(model, valid_data):
    hook = getattr(model, "before_test", None)
    if hook is not None:
        hook(valid_data)


def extra_results(model):
    return dict(getattr(model, "extra_results", None) or {})
