"""TextSeqRec: a text two-tower sequential recommender (the backbone of MergeRec, BLaIR-style).

User tower: the encoder over the history's item texts ("title: … brand: … category: …", most recent first, joined
"; "). Item tower: the same encoder over each item's text. CLS or mean pooling (``pooling``), score = cosine /
temperature. Trained with in-batch softmax (or a full softmax over cached catalogue embeddings) by RecBole's trainer
with gradient accumulation and a warmup + linear decay schedule (``trainer.py``). For evaluation the catalogue is
encoded once and cached until the next training step or weight load; users are encoded ``encode_batch_size`` at a
time and the trainer scores at most that many users at once (``trainer.ChunkedEvaluation``). ``precision: auto``
runs the encoder under bf16 autocast on CUDA only (``encoder.autocast_dtype``).
"""
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, ModelType

from recbole_weaverec import distributed
from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.itemtext import FIELD_LABELS, MissingTextFieldError, check_fields, field_values
from recbole_weaverec.checks import check_choice, check_int, check_number, name_list
from recbole_weaverec.model.abstract import ModelHooks
from recbole_weaverec.model.twotower.encoder import POOLINGS, PRECISIONS, TextTower
from recbole_weaverec.model.twotower.trainer import LR_SCHEDULES, TextSeqRecTrainer
from recbole_weaverec.textembed import resolve_encoder_path

SOFTMAX = ("in_batch", "full")


def item_attributes(dataset, fields):
    """Per internal item id, its (label, value) pairs of the fields the dataset has (labels as in the paper)."""
    fields = check_fields(dataset, list(fields), require_all=False)
    columns = [field_values(dataset, f) for f in fields]
    items = [[(FIELD_LABELS.get(f, f), v) for f, v in zip(fields, values) if v] for values in zip(*columns)]
    items[0] = []  # padding item
    return items


class TextSeqRec(ModelHooks, SequentialRecommender):
    input_type = InputType.POINTWISE
    type = ModelType.SEQUENTIAL
    trainer_class = TextSeqRecTrainer

    @classmethod
    def validate_config(cls, config):
        check_number(config, "temperature", low=0, low_open=True)
        for key in ("max_seq_items", "max_user_tokens", "encode_batch_size", "full_softmax_refresh",
                    "gradient_accumulation_steps"):
            check_int(config, key, low=1)
        check_choice(config, "softmax", SOFTMAX)
        check_int(config, "max_train_samples", low=1, allow_none=True)
        cuts = [check_int(config, key, low=1, allow_none=True) for key in ("max_item_tokens", "max_attribute_tokens")]
        if cuts == [None, None]:
            raise ConfigError("max_item_tokens=None and max_attribute_tokens=None is not allowed: set at least one "
                              "(each attribute cut to max_attribute_tokens, or the whole item text to max_item_tokens)")
        if config["pooling"] is not None and config["pooling"] not in POOLINGS:
            raise ConfigError(f"pooling={config['pooling']!r} is not allowed: expected cls, mean or ~ (mean for a "
                              f"mean-pooling sentence-transformers encoder such as the embedded MiniLM, else cls)")
        check_choice(config, "lr_schedule", LR_SCHEDULES)
        check_choice(config, "precision", PRECISIONS)
        check_number(config, "warmup_ratio", low=0, high=1)
        check_int(config, "warmup_steps", low=0, allow_none=True)
        fields = name_list(config["text_fields"])
        if not isinstance(fields, (list, tuple)) or not fields or not all(isinstance(f, str) for f in fields):
            raise ConfigError(f"text_fields={config['text_fields']!r} is not allowed: expected a non-empty list of "
                              f"item field names, e.g. [title, brand, categories]")

    def __init__(self, config, dataset, encoder=None):
        """``encoder``: an encoder module to share instead of loading one (MergeRec's per-domain towers)."""
        super().__init__(config, dataset)
        TextSeqRec.validate_config(config)  # (MergeRec checks its own keys; these are the towers')
        fields = list(name_list(config["text_fields"]))
        items = item_attributes(dataset, fields)
        if not any(items[1:]):
            raise MissingTextFieldError(f"dataset {dataset.dataset_name!r}: no item has any text in text_fields="
                                        f"{fields}")
        self.temperature = float(config["temperature"])
        self.softmax = config["softmax"]
        self.encode_batch_size = config["encode_batch_size"]
        self.full_softmax_refresh = config["full_softmax_refresh"]
        self.show_progress = bool(config["show_progress"])
        self.encoder_path = resolve_encoder_path(config["text_encoder_path"])
        self.tower = TextTower(self.encoder_path, items, config["max_item_tokens"], config["max_user_tokens"],
                               config["max_seq_items"], max_attribute_tokens=config["max_attribute_tokens"],
                               pooling=config["pooling"], precision=config["precision"], encoder=encoder)
        self._item_cache = None  # all item embeddings for evaluation (no grad)
        self._train_catalogue = None  # detached catalogue for the full softmax, refreshed every N steps
        self._steps = 0

    # --- embeddings -----------------------------------------------------------------------------------------
    def user_embeddings(self, interaction, params=None):
        return self.tower.encode(self.tower.user_inputs(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]),
                                 params=params)

    def item_embeddings(self, items, params=None):
        return self.tower.encode(self.tower.item_inputs(items), params=params)

    def all_item_embeddings(self, params=None):
        return self.tower.encode_all(self.tower.item_inputs(range(self.n_items)), self.encode_batch_size,
                                     params=params, progress=self.show_progress)

    def invalidate_item_cache(self):
        self._item_cache = None
        self._train_catalogue = None

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self.invalidate_item_cache()  # new weights: cached embeddings are stale
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _cached_items(self):
        if self._item_cache is None:
            was_training = self.training
            self.eval()
            self._item_cache = self.all_item_embeddings()
            self.train(was_training)
        return self._item_cache

    # --- training -------------------------------------------------------------------------------------------
    def calculate_loss(self, interaction):
        self._item_cache = None  # weights are about to change
        user = self.user_embeddings(interaction)
        pos = interaction[self.POS_ITEM_ID]
        if self.softmax == "in_batch":
            # each distinct positive once, so a repeated item is never its own negative; in a data-parallel run the
            # negatives are the positives of the whole global batch (all processes), as with one process
            items = torch.unique(distributed.all_gather_rows(pos))
            target = torch.searchsorted(items, pos)
            logits = user @ self.item_embeddings(items).T
        else:
            if self._train_catalogue is None or self._steps % self.full_softmax_refresh == 0:
                self._train_catalogue = self.all_item_embeddings()
            logits = user @ self._train_catalogue.T
            # the positives get fresh embeddings, so the item tower receives gradient too
            fresh = (user * self.item_embeddings(pos)).sum(-1, keepdim=True)
            logits = logits.scatter(1, pos.unsqueeze(1), fresh)
            logits[:, 0] = float("-inf")  # padding item
            target = pos
        self._steps += 1
        return F.cross_entropy(logits / self.temperature, target)

    # --- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def full_sort_predict(self, interaction):
        # users in chunks of encode_batch_size: a large evaluation batch never runs the encoder on all of it at once
        seq, seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        n, step = len(seq_len), self.encode_batch_size
        user = torch.cat([self.tower.encode(self.tower.user_inputs(seq[s:s + step], seq_len[s:s + step]))
                          for s in range(0, n, step)]) if n > step else self.user_embeddings(interaction)
        return user @ self._cached_items().T / self.temperature

    @torch.no_grad()
    def predict(self, interaction):
        # sampled evaluation repeats each user once per candidate: encode each distinct history once
        seq, seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        key = torch.cat([seq, seq_len.unsqueeze(1)], dim=1)
        uniq, inverse = torch.unique(key, dim=0, return_inverse=True)
        user = self.tower.encode(self.tower.user_inputs(uniq[:, :-1], uniq[:, -1]))
        items = self._cached_items()[interaction[self.ITEM_ID]]
        return (user[inverse] * items).sum(-1) / self.temperature
