"""``LLMTrainer``: RecBole's Trainer driving LoRA training of the LLM recommenders.

RecBole's ``fit`` keeps its epochs, validation every ``eval_step`` epochs, early stopping on ``valid_metric``,
checkpoints of the best epoch and logging; an epoch iterates over the model's own prompt samples
(``model.training_samples()``) instead of RecBole's training batches, with AdamW + warmup/cosine on the LoRA weights
only. A model with nothing to train (LLMMerge, or a reused adapter) is validated once; ``eval_step: 0`` skips
validation, as RecBole's ``fit`` does (the last epoch is kept). Before the final evaluation
the best adapter is reloaded, saved as a peft folder under ``<checkpoint_dir>/<run>/adapters/<name>`` and folded.
With ``llm_eval: generate`` the sampled-candidate score matrix is adjusted so that RecBole's ranks are the generated
positions (``generation.as_generated_ranking``).
"""
import os
from pathlib import Path
from time import time

import torch
from recbole.trainer import Trainer
from recbole.utils import EvaluatorType, set_color

from recbole_weaverec import compat
from recbole_weaverec.model.llm.generation import as_generated_ranking


class _NoOptimizer(torch.optim.SGD):
    """Stands in for the optimizer of a model with nothing to train (RecBole's checkpoints save one)."""

    def __init__(self):
        super().__init__([torch.zeros(1, requires_grad=True)], lr=0.0)


class LLMTrainer(Trainer):
    manual_gradient_sync = True  # no DDP wrapper: LoraLearner all-reduces the LoRA gradients (distributed.py)

    def __init__(self, config, model):
        self.lora_learner = None
        super().__init__(config, model)
        self._validating = False
        run = Path(self.saved_model_file).stem
        if config["adapter_dir"]:
            model.adapter_root = Path(os.path.expanduser(config["adapter_dir"]))
        else:
            model.adapter_root = Path(self.checkpoint_dir) / run / "adapters"
            # a failed run leaves no adapter folders of its own behind (see quick_start._remove_partial_output)
            config.final_config_dict.setdefault("_run_outputs", []).append(str(model.adapter_root.parent))

    def _build_optimizer(self, **kwargs):
        from recbole_weaverec.model.llm.training import LoraLearner

        samples = self.model.training_samples()
        if not samples or not any(p.requires_grad for p in self.model.parameters()):
            return _NoOptimizer()
        self.lora_learner = LoraLearner(self.model.llm, self.model.settings, len(samples))
        return self.lora_learner.optimizer

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        model = self.model
        return self.lora_learner.epoch(model.training_samples(), model.builder, model.domains, epoch_idx,
                                       progress=show_progress, desc=f"training {self.config['model']} LoRA")

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.model.prepare(self)
        if self.lora_learner is not None:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        # nothing to train: one validation (none with eval_step <= 0, as in RecBole's fit), one checkpoint
        if valid_data and self.eval_step > 0:
            start = time()
            self.best_valid_score, self.best_valid_result = self._valid_epoch(valid_data, show_progress)
            if verbose:
                self.logger.info(set_color("evaluating", "green") + f" [time: {time() - start:.2f}s, valid_score: "
                                 f"{self.best_valid_score:f}]")
        if saved:
            self._save_checkpoint(0, verbose=verbose)
        return self.best_valid_score, self.best_valid_result

    def _valid_epoch(self, valid_data, show_progress=False):
        self._validating = True
        try:
            return super()._valid_epoch(valid_data, show_progress)
        finally:
            self._validating = False

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if not self._validating:  # the final evaluation: best adapter -> peft folder -> folded into the base
            if load_best_model and not self.model.folded:
                file = model_file or self.saved_model_file
                compat.check_checkpoint_model(file, self.config["model"])
                checkpoint = torch.load(file, map_location=self.device)
                self.model.load_state_dict(checkpoint["state_dict"])
                self.model.load_other_parameter(checkpoint.get("other_parameter"))
                self.logger.info(f"Loading model structure and parameters from {file}")
            self.model.finish(self)
        return super().evaluate(eval_data, load_best_model=False, model_file=model_file, show_progress=show_progress)

    def _neg_sample_batch_eval(self, batched_data):
        """RecBole's, then (``llm_eval: generate``) the positions the model generated turned into ranks: RecBole
        fills non-candidates with -inf too, so an unmatched truth would tie with them (torch.topk picks among ties
        arbitrarily). Uses the candidates of each row only, never the labels."""
        model = self.model
        model.generated_positions = False  # set by model.predict when it generated (not e.g. WeaveRec's Pop rows)
        interaction, scores, positive_u, positive_i = super()._neg_sample_batch_eval(batched_data)
        if model.generated_positions and self.config["eval_type"] == EvaluatorType.RANKING:
            row_idx = batched_data[1].to(scores.device)
            listed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            listed[row_idx, interaction[self.config["ITEM_ID_FIELD"]].to(scores.device)] = True
            topk = self.config["topk"]
            scores = as_generated_ranking(scores, listed, max(topk) if isinstance(topk, list) else int(topk))
        return interaction, scores, positive_u, positive_i
