"""``LLMRecommender``: the RecBole sequential model shared by LLMRec, LLMJoint, LLMMerge (and WeaveRec).

A causal LM (``llm_path``) reads a prompt built from the titles of the items in RecBole's ITEM_SEQ and scores each
candidate by the length-normalised log-likelihood of its title as the answer (``scoring.py``). Only LoRA weights
train; the model's ``state_dict`` (what RecBole's checkpoints hold) is those trainable weights only, so the frozen
base model is never written into a checkpoint. Before the final evaluation the adapter is folded into the base
weights (``merge_and_unload``), so evaluation costs what the base model costs. ``llm_eval: generate`` instead answers
each user's prompt greedily and ranks the candidates by where their titles come in the answer (``generation.py``).
"""
import os
from pathlib import Path

import numpy as np
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, ModelType

from recbole_weaverec.checks import check_bool, check_choice, check_int, check_number
from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.crossdomain import check_domain_files, domain_list, with_sample_sources
from recbole_weaverec.errors import FullSortTooLargeError
from recbole_weaverec.model.abstract import ModelHooks
from recbole_weaverec.merging import check_adapter_paths
from recbole_weaverec.model.llm import generation
from recbole_weaverec.model.llm.backbone import load_backbone
from recbole_weaverec.model.llm.prompts import PromptBuilder
from recbole_weaverec.model.llm.scoring import score_candidates, score_users
from recbole_weaverec.model.llm.trainer import LLMTrainer
from recbole_weaverec.model.llm.train_modes import ATTENTION_KERNELS
from recbole_weaverec.model.llm.training import LoraSettings, training_key
from recbole_weaverec.model.llm.samples import domain_data, target_valid_split

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}
LLM_EVALS = ("likelihood", "generate")


def _modes(config):
    modes = config["eval_args"]["mode"]
    return list(modes.values()) if isinstance(modes, dict) else [modes]


class LLMRecommender(ModelHooks, SequentialRecommender):
    type = ModelType.SEQUENTIAL
    input_type = InputType.POINTWISE
    trainer_class = LLMTrainer

    config_family = "llm"  # defaults: properties/model/base/llm.yaml, then properties/model/NAME.yaml
    uses_sources = False  # models with source domains get the bundled sample's default sources
    min_epochs = 1  # LLMRec: 0 = the embedded LM as it is (its untrained, zero-shot start)

    @classmethod
    def validate_config(cls, config):
        if cls.uses_sources:
            with_sample_sources(config)
        check_int(config, "epochs", low=cls.min_epochs)
        for key in ("max_history", "max_title_tokens", "lora_r", "train_batch_size",
                    "gradient_accumulation_steps", "score_chunk_size", "max_full_sort_items",
                    "score_users_per_batch"):
            check_int(config, key, low=1)
        check_int(config, "max_train_samples", low=1, allow_none=True)
        check_int(config, "train_tokens_per_pass", low=1, allow_none=True)
        check_int(config, "max_prompt_tokens", low=1, allow_none=True)
        check_int(config, "train_length_buckets", low=0, allow_none=True)
        check_bool(config, "gradient_checkpointing")
        if config["train_attention"] is not None:
            check_choice(config, "train_attention", ATTENTION_KERNELS)
        if not (config["train_compile"] == "auto" or isinstance(config["train_compile"], bool)):
            raise ConfigError(f"train_compile={config['train_compile']!r} is not allowed: expected one of auto, True, "
                              f"False")
        check_int(config, "num_prompt_candidates", low=1)
        check_number(config, "lora_alpha", low=0, low_open=True)
        check_number(config, "lora_dropout", low=0, high=1, high_open=True)
        check_number(config, "learning_rate", low=0, low_open=True)
        check_number(config, "warmup_ratio", low=0, high=1)
        check_bool(config, "prompt_candidates")
        check_bool(config, "train_bf16")
        check_bool(config, "train_valid_items")
        check_choice(config, "llm_dtype", tuple(DTYPES))
        check_choice(config, "llm_eval", LLM_EVALS)
        check_choice(config, "llm_score", ("mean", "sum"))
        check_int(config, "generate_max_new_tokens", low=1, allow_none=True)
        if config["llm_eval"] == "generate" and "full" in _modes(config):
            raise ConfigError(f"llm_eval='generate' is not allowed with eval_mode=full (eval_args.mode="
                              f"{config['eval_args']['mode']!r}): generated titles are matched against sampled "
                              f"candidates; use a sampled eval_mode (e.g. uni29) or llm_eval=likelihood")
        target = config["lora_target_modules"]
        if not (isinstance(target, str) or (isinstance(target, list) and target
                                            and all(isinstance(t, str) for t in target))):
            raise ConfigError(f"lora_target_modules={target!r} is not allowed: expected 'all-linear' or a list of "
                              f"module names, e.g. [q_proj, v_proj]")
        paths = config["adapter_paths"] if "adapter_paths" in config else None
        if paths is not None and not (isinstance(paths, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                                      for k, v in paths.items())):
            raise ConfigError(f"adapter_paths={paths!r} is not allowed: expected a mapping domain -> adapter folder, "
                              f"e.g. \"{{'amazon-toys': 'saved/run/adapters/amazon-toys'}}\"")

    @classmethod
    def adapter_keys(cls, config):
        """The ``adapter_paths`` keys this model reads; any other key would be ignored and a new adapter trained."""
        return [config["dataset"]]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.validate_config(config)
        # after validate_config (which may set source_domains): every key is read, every folder is a whole adapter
        check_adapter_paths(config["adapter_paths"], self.adapter_keys(config), config["model"])
        if config["source_domains"]:  # a broken source file must not surface after θ0 has trained
            check_domain_files(config, domain_list(config, "source_domains"))
        self.config = config
        self.llm, self.tokenizer, self.base_name = load_backbone(
            config["llm_path"], self.device, DTYPES[config["llm_dtype"]], config["llm_cache_dir"])
        self.llm.requires_grad_(False)
        self.builder = PromptBuilder(self.tokenizer, config["max_history"], config["max_title_tokens"],
                                     config["prompt_candidates"], config["max_prompt_tokens"])
        self.settings = LoraSettings.from_config(config)
        valid = target_valid_split(config, dataset) if config["train_valid_items"] else None
        self.target = domain_data(config["dataset"], dataset, dataset, config["title_field"],
                                  config["title_fallback_field"], valid)
        self.domains = {self.target.name: self.target}
        self.adapter_paths = {k: os.path.expanduser(v) for k, v in (config["adapter_paths"] or {}).items()}
        self.adapter_root = None  # set by the trainer: <checkpoint_dir>/<run>/adapters or adapter_dir
        self.folded = False
        self.show_progress = bool(config["show_progress"])
        self.generates = config["llm_eval"] == "generate"
        self.generated_positions = False  # set by predict: its scores are generated positions (read by LLMTrainer)
        if "full" in _modes(config):
            self._check_full_sort()  # refuse before training, not after
        if self.generates:
            self._check_generate()

    def _check_full_sort(self):
        n = self.n_items
        if n - 1 > self.config["max_full_sort_items"]:
            raise FullSortTooLargeError(
                f"full-ranking evaluation of {self.config['model']} on {self.target.name!r} would score all {n - 1} "
                f"item titles per user (max_full_sort_items={self.config['max_full_sort_items']}); use "
                f"eval_mode=uni29 or raise max_full_sort_items")

    def _check_generate(self):
        """Generated positions become ranks through non-candidate items (``generation.as_generated_ranking``): up to
        max(topk) of them per user, beside uniN/popN's N + 1 candidates."""
        k = max(self.config["topk"]) if isinstance(self.config["topk"], list) else int(self.config["topk"])
        sampled = [int(m[3:]) for m in _modes(self.config) if m[:3] in ("uni", "pop") and m[3:].isdigit()]
        need = max(sampled, default=0) + k
        if self.n_items - 1 < need:
            raise ConfigError(f"llm_eval='generate' needs at least {need} items (candidates + max(topk)={k}); "
                              f"{self.target.name!r} has {self.n_items - 1}: use llm_eval=likelihood")

    # --- what the trainer asks ------------------------------------------------------------------------------
    def training_samples(self):
        """The samples the trainer iterates over each epoch ([] when nothing is trained)."""
        return []

    def prepare(self, trainer):
        """Called by the trainer before its epochs (LLMMerge builds its merged model here)."""

    def adapter_name(self):
        return self.target.name

    def _num_candidates(self):
        return self.config["num_prompt_candidates"] if self.config["prompt_candidates"] else 0

    def domain_key(self, name):
        """Training key of ``name``'s own adapter (``max_train_samples`` prefixes of that domain alone). LLMRec
        saves it with the adapter it trains and LLMMerge/WeaveRec look for it, so they reuse each other's."""
        return training_key(self.base_name, {name: self.config["max_train_samples"]}, self.settings, self.builder,
                            self._num_candidates())

    def adapter_key(self):
        """Training key saved with the adapter this model trains (``finish``)."""
        return self.domain_key(self.target.name)

    def finish(self, trainer):
        """Before the final evaluation: save the trained adapter as a peft folder, then fold it into the base."""
        from peft import PeftModel

        if self.folded:
            return
        if isinstance(self.llm, PeftModel) and self.training_samples() and self.adapter_root is not None:
            from recbole_weaverec.model.llm.training import adapter_meta, save_adapter

            folder = Path(self.adapter_root) / self.adapter_name()
            save_adapter(self.llm, folder, adapter_meta(self.llm, self.training_samples(), self.settings,
                                                        key=self.adapter_key()))
            trainer.logger.info(f"adapter saved: {folder}")
        self.fold()

    def fold(self):
        """Merge the LoRA weights into the base weights and drop the adapter (``merge_and_unload``)."""
        from peft import PeftModel

        if isinstance(self.llm, PeftModel):
            self.llm = self.llm.merge_and_unload()
        self.folded = True

    # --- checkpoints hold only what trains --------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        trainable = {prefix + n for n, p in self.named_parameters() if p.requires_grad}
        return type(full)((k, v) for k, v in full.items() if k in trainable)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict and result.unexpected_keys:
            raise ConfigError(f"checkpoint has weights this model does not have, e.g. {result.unexpected_keys[0]} "
                              f"(saved with other LoRA settings?)")
        return result

    # --- RecBole interface ------------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.llm(*args, **kwargs)

    def calculate_loss(self, interaction):
        """Answer-token loss of a collated batch of our samples (RecBole's batches are not used for training)."""
        from recbole_weaverec.model.llm.training import answer_loss

        return answer_loss(self.llm, interaction)

    def _titles(self, items):
        return [self.target.titles[int(i)] for i in items]

    def _user_inputs(self, history, candidates, listed=None, order_seed=0):
        """(prompt ids, answer ids of each distinct candidate, which answer each of ``candidates`` is)."""
        if listed is None and self.builder.prompt_candidates:
            listed = list(dict.fromkeys(int(c) for c in candidates))
            np.random.default_rng([int(self.config["seed"]), int(order_seed)]).shuffle(listed)
        prompt = self.builder.prompt_ids(self._titles(history), self._titles(listed) if listed else None)
        unique = list(dict.fromkeys(int(c) for c in candidates))
        answers = [self.builder.answer_ids(self.target.titles[c]) for c in unique]
        index = {c: i for i, c in enumerate(unique)}
        return prompt, answers, [index[int(c)] for c in candidates]

    def score_user(self, history, candidates, listed=None, order_seed=0):
        """Scores of ``candidates`` (target item ids) for one user with ``history`` (item ids, oldest first).

        ``listed``: the candidates written into the prompt (default: ``candidates`` in a seeded random order; never
        RecBole's order, which puts the true item first)."""
        prompt, answers, picks = self._user_inputs(history, candidates, listed, order_seed)
        scores = score_candidates(self.llm, prompt, answers, self.config["score_chunk_size"],
                                  self.tokenizer.pad_token_id, normalize=self.config["llm_score"] != "sum")
        return scores[picks]

    def generate_user(self, history, candidates, listed=None, order_seed=0):
        """``llm_eval: generate``: scores of ``candidates`` from the greedy answer to the prompt ``score_user``
        builds (-j for a title first generated at position j, -inf when not generated; ``generation.py``)."""
        prompt, _, picks = self._user_inputs(history, candidates, listed, order_seed)
        unique = list(dict.fromkeys(int(c) for c in candidates))
        titles = [self.builder.truncate(self.target.titles[c]) for c in unique]  # as the prompt renders them
        max_new = self.config["generate_max_new_tokens"] or \
            generation.default_max_new_tokens(self.config["max_title_tokens"])
        scores = generation.generate_scores(self.llm, self.tokenizer, prompt, titles, max_new,
                                            generation.stop_ids(self.tokenizer, self.builder.end_of_turn))
        return scores[picks]

    def score_many(self, requests, progress=None):
        """``score_user(*r)`` for each r of ``requests``, ``score_users_per_batch`` users per forward (1: one user
        at a time, the exact single-user path). ``progress`` (a tqdm bar) is advanced by each user.
        ``llm_eval: generate``: ``generate_user`` per user (one greedy generate call each)."""
        per_batch = 1 if self.generates else self.config["score_users_per_batch"] or 1
        out = []
        for i in range(0, len(requests), per_batch):
            batch = requests[i:i + per_batch]
            if self.generates:
                out.append(self.generate_user(*batch[0]))
            elif per_batch == 1:
                out.append(self.score_user(*batch[0]))
            else:
                inputs = [self._user_inputs(*r) for r in batch]
                scores = score_users(self.llm, [(p, a) for p, a, _ in inputs], self.config["score_chunk_size"],
                                     self.tokenizer.pad_token_id, normalize=self.config["llm_score"] != "sum")
                out += [s[picks] for s, (_, _, picks) in zip(scores, inputs)]
            if progress is not None:
                progress.update(len(batch))
        return out

    def _groups(self, interaction):
        seq, lengths = interaction[self.ITEM_SEQ].cpu(), interaction[self.ITEM_SEQ_LEN].cpu()
        users = interaction[self.USER_ID].cpu() if self.USER_ID in interaction.interaction else \
            torch.zeros_like(lengths)
        key = torch.cat([users[:, None], lengths[:, None], seq], dim=1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        for g in torch.unique(inverse).tolist():
            rows = torch.nonzero(inverse == g).flatten()
            r = int(rows[0])
            history = seq[r, :int(lengths[r])].tolist()
            yield rows, history, int(users[r]) * 1000003 + int(lengths[r])

    def predict(self, interaction):
        """RecBole's sampled modes (uni29, pop100, ...): the rows of one user (same ITEM_SEQ) are scored together,
        from one prompt listing that user's candidates."""
        from tqdm.auto import tqdm

        self.llm.eval()
        items = interaction[self.ITEM_ID].cpu()
        out = torch.empty(len(items), dtype=torch.float32)
        groups = list(self._groups(interaction))
        with tqdm(total=len(groups), desc="scoring users", unit="user", disable=not self.show_progress,
                  leave=False) as bar:
            scores = self.score_many([(history, items[rows].tolist(), None, seed) for rows, history, seed in groups],
                                     bar)
        self.generated_positions = self.generates
        for (rows, _, _), s in zip(groups, scores):
            out[rows] = s
        return out.to(self.device)

    def full_sort_predict(self, interaction):
        """``full`` mode: every item's title is scored for every user (cost per user ≈ one prompt pass plus
        n_items/score_chunk_size batched title passes, i.e. ~n_items/30 times a uni29 user); the prompt lists no
        candidates. Refused beyond ``max_full_sort_items`` items."""
        self._check_full_sort()
        n = self.n_items
        self.llm.eval()
        seq, lengths = interaction[self.ITEM_SEQ].cpu(), interaction[self.ITEM_SEQ_LEN].cpu()
        out = torch.full((len(seq), n), -torch.inf)
        items = list(range(1, n))
        scores = self.score_many([(seq[r, :int(lengths[r])].tolist(), items, [], 0) for r in range(len(seq))])
        for r, s in enumerate(scores):
            out[r, 1:] = s
        return out.flatten().to(self.device)
