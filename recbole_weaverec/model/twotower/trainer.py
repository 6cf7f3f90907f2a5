"""TextSeqRec's trainer: RecBole's, plus the MergeRec authors' fine-tuning shape.

- gradient accumulation: ``gradient_accumulation_steps`` micro-batches of ``train_batch_size`` per optimizer step
  (each micro-batch loss divided by the window's size, so k micro-batches of a per-row mean loss give one batch of
  k× size). With ``softmax: in_batch`` each micro-batch keeps its own negatives, as in the authors' Lightning code.
- learning-rate schedule per optimizer step: ``lr_schedule: linear`` = linear warmup over ``warmup_steps`` (or
  ``warmup_ratio`` of the planned steps) then linear decay to 0 at the last planned step
  (``transformers.get_linear_schedule_with_warmup``); ``constant`` = RecBole's fixed rate.
- full-ranking evaluation in chunks of ``encode_batch_size`` users (``ChunkedEvaluation``).
- ``max_train_samples: N``: each fit trains on N rows (training prefixes) of the split drawn with ``seed``
  (``sample_training_rows``), the CPU scale of a whole domain; valid and test keep every user.
- ``epochs: 0`` evaluates the pretrained encoder as it is (a model's untrained start, beside the trained one).
Early stopping on ``valid_metric`` (default NDCG@10) after ``stopping_step`` evaluations without gain, keeping the
best checkpoint, is RecBole's own ``fit``.
"""
import math

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader
from recbole.trainer import Trainer
from torch.nn.utils.clip_grad import clip_grad_norm_

LR_SCHEDULES = ("linear", "constant")


def sample_training_rows(train_data, n, seed):
    """A loader of the same kind over ``n`` rows of ``train_data``'s dataset drawn without replacement with
    ``seed`` (numpy's generator: the same rows on every machine and for every model of one seed); ``train_data``
    itself when ``n`` is None or not below the split's size."""
    dataset = train_data._dataset
    if n is None or n >= len(dataset):
        return train_data
    rows = np.sort(np.random.default_rng(seed).choice(len(dataset), int(n), replace=False))
    sub = dataset.copy(dataset.inter_feat[torch.from_numpy(rows)])
    return type(train_data)(train_data.config, sub, train_data._sampler, shuffle=train_data.shuffle)


class UserChunks(FullSortEvalDataLoader):
    """A sequential full-sort loader's batches cut into chunks of at most ``users`` users.

    RecBole's loader gives a sequential model ``eval_batch_size`` users per batch, and quick_start sizes that from the
    catalogue for general models (256 × n_items), so a TextSeqRec batch can hold every test user: the users × items
    score matrix and the collector's matrices of the same shape then grow with the whole split. Each chunk is what
    the loader would yield with a smaller batch (rows, and the positives re-indexed to them), so metrics are equal.
    Only iteration is replaced; the torch DataLoader machinery of ``loader`` does the loading.
    """

    def __init__(self, loader, users):  # the DataLoader's own __init__ is not run: nothing is loaded twice
        self.loader, self.users = loader, int(users)
        self._dataset = loader._dataset

    def __len__(self):
        n, step = self.loader.sample_size, self.loader.step
        full, rest = divmod(n, step)
        return full * math.ceil(step / self.users) + math.ceil(rest / self.users)

    def __iter__(self):
        for interaction, history, positive_u, positive_i in self.loader:
            n = len(interaction)
            if history is not None or n <= self.users:  # (a general model's batch: users already few per batch)
                yield interaction, history, positive_u, positive_i
                continue
            for start in range(0, n, self.users):
                end = min(start + self.users, n)
                keep = (positive_u >= start) & (positive_u < end)
                yield interaction[start:end], None, positive_u[keep] - start, positive_i[keep]


class ChunkedEvaluation:
    """Trainer mixin: full-ranking evaluation scores at most the model's ``encode_batch_size`` users at once
    (``UserChunks``); the model's, as MergeRec's own config does not hold TextSeqRec's keys."""

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        users = getattr(self.model, "encode_batch_size", None)
        if users and isinstance(eval_data, FullSortEvalDataLoader) and not isinstance(eval_data, UserChunks) \
                and eval_data.is_sequential:
            eval_data = UserChunks(eval_data, users)
        return super().evaluate(eval_data, load_best_model, model_file, show_progress)


class TextSeqRecTrainer(ChunkedEvaluation, Trainer):
    def __init__(self, config, model):
        super().__init__(config, model)
        self.accumulation = int(config["gradient_accumulation_steps"] or 1)
        self.lr_schedule = config["lr_schedule"] or "constant"
        self.scheduler = None
        self.optimizer_steps = 0  # (RecBole's cur_step counts evaluations without improvement)

    def planned_steps(self, train_data):
        per_epoch = math.ceil(len(train_data) / self.accumulation)
        return max(per_epoch * max(self.epochs - self.start_epoch, 0), 1)

    def warmup(self, total):
        steps = self.config["warmup_steps"]
        return int(steps) if steps is not None else int(round(float(self.config["warmup_ratio"]) * total))

    def build_scheduler(self, train_data):
        if self.lr_schedule != "linear":
            return None
        from transformers import get_linear_schedule_with_warmup

        total = self.planned_steps(train_data)
        return get_linear_schedule_with_warmup(self.optimizer, self.warmup(total), total)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        train_data = sample_training_rows(train_data, self.config["max_train_samples"], self.config["seed"])
        self.scheduler = self.build_scheduler(train_data)
        result = super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved and self.epochs <= self.start_epoch:  # epochs: 0 = the untouched encoder (the untrained start):
            self._save_checkpoint(self.start_epoch, verbose=verbose)  # the checkpoint evaluate() loads
        return result

    def _optimizer_step(self, scaler):
        if self.clip_grad_norm:
            scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()
        self.optimizer_steps += 1

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        """RecBole's epoch (AMP, data-parallel sync, NaN check) with an optimizer step every k micro-batches."""
        from recbole.utils import set_color
        from tqdm import tqdm

        self.model.train()
        loss_func = loss_func or self.model.calculate_loss
        n, k = len(train_data), self.accumulation
        iter_data = tqdm(train_data, total=n, ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")) \
            if show_progress else train_data
        if not self.config["single_spec"] and train_data.shuffle:
            train_data.sampler.set_epoch(epoch_idx)
        scaler = torch.amp.GradScaler("cuda", enabled=self.enable_scaler)
        total_loss = 0.0
        self.optimizer.zero_grad()
        for i, interaction in enumerate(iter_data):
            interaction = interaction.to(self.device)
            window = min(k, n - (i // k) * k)  # an epoch's last window may hold fewer micro-batches
            sync_loss = 0
            if not self.config["single_spec"]:
                self.set_reduce_hook()
                sync_loss = self.sync_grad_loss()
            with torch.autocast(device_type=self.device.type, enabled=self.enable_amp):
                loss = loss_func(interaction)
            total_loss += loss.item()
            self._check_nan(loss)
            scaler.scale((loss + sync_loss) / window).backward()
            if (i + 1) % k == 0 or i + 1 == n:
                self._optimizer_step(scaler)
        return total_loss
