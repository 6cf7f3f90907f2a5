"""WeaveRec (arXiv 2510.26546): hybrid LoRAs woven from target and source data, merged into one adapter that is
folded into the base weights, so the recommender costs exactly what the target-only model costs at inference.

Modules (each a LoRA over the same base LLM, all trained on the target's own task format):

* θ0 = ``<target>``: LoRA on the target's samples only (the same adapter LLMRec trains; reused from
  ``adapter_paths[<target>]`` or the adapter folder when present).
* θi = ``<target>~<source_i>``: a *hybrid* LoRA on a seeded shuffle of ``weave_target_samples`` target samples and
  ``weave_source_samples`` samples of source i. Every sample carries its own domain; source items are written with
  source titles from the source's own RecBole dataset and never looked up in the target's id space.

Merge at the ΔW = (α/r)·B·A level (so ranks may differ), per adapted module: ΔW = Σ_i w_i·ΔW_i with

* ``weave_merge: average``: w_i = 1/(N+1) (the reference's released setting, λ = 1 for all);
* ``weave_merge: weights``: w = ``weave_weights`` (θ0 first, then one per source);
* ``weave_merge: learned``: w = softmax(λ/T) with one λ row per adapted module (``merging.streaming.FactorMerge``:
  the coefficients multiply each module's B·A on the fly, no stacked ΔW; init λ = 1, i.e. the average), fitted
  AdaMerging-style on unlabeled target validation prompts: the validation users' histories and their 30 candidates
  (never which one is the answer) -> minimise the entropy of the merged model's distribution over the candidates;
  only λ trains.

The merged ΔW is folded into the base weights one adapted weight at a time, on the model's device
(``merging.streaming.fold_merged``; never every ΔW of the model at once): the evaluated model is a plain model with
the base model's parameter count. With ``weave_compare_target_only`` the final evaluation also scores θ0 alone
(folded the same way) on the same users and candidates and logs both side by side (``target_only_test_result`` in
the run's result dict; a caller that sets ``trainer.per_user_records`` to a ``stats.recording_per_user``
list gets their per-user values in ``trainer.extra_per_user``, as ``benchmarks/paper_comparison.py`` does).

Adapters are folders named after their module under the adapter folder: ``adapter_dir`` when given, else
``<checkpoint_dir>/weaverec-adapters/<hash of the training settings>``, so a rerun (or a run interrupted between
modules) reuses every module already trained with the same settings and trains only the missing ones.
"""
import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from recbole_weaverec import merging
from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.crossdomain import domain_list, with_sample_sources
from recbole_weaverec.checks import check_bool, check_choice, check_int, check_number
from recbole_weaverec.merging.streaming import FactorMerge, MergedDeltas, fold_merged
from recbole_weaverec.model.llm.llmmerge import LLMMerge
from recbole_weaverec.model.llm.scoring import score_candidates
from recbole_weaverec.model.llm.trainer import LLMTrainer
from recbole_weaverec.compat import release_memory
from recbole_weaverec.model.llm.training import check_adapter_base, ensure_adapter, training_key
from recbole_weaverec.model.llm.samples import build_samples, mix_samples

MERGES = ("average", "weights", "learned")
HYBRID_SEP = "~"  # hybrid module of target T and source S: "T~S"


class WeaveTrainer(LLMTrainer):
    """LLMTrainer that hands the validation data to the model (learned merge) and, in the final evaluation, also
    evaluates θ0 alone on the same data (``weave_compare_target_only``)."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if valid_data is not None or not hasattr(self, "weave_valid_data"):  # a caller may set it beforehand
            self.weave_valid_data = valid_data
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        model = self.model
        if self._validating or not eval_data or not model.config["weave_compare_target_only"]:
            return result
        model.extra_results, self.extra_per_user = {}, {}
        compared = [("θ0 (LLMRec)", "target_only_test_result", model.target_only)]
        if model.config["weave_compare_baselines"]:  # where the demo stands: the untrained LLM and popularity
            compared += [("zero-shot", "zero_shot_test_result", model.zero_shot),
                         ("Pop", "pop_test_result", model.popularity)]
        rows = {"WeaveRec": result}
        for label, key, setting in compared:
            rows[label] = model.extra_results[key] = self._compare(key, setting, eval_data, model_file, show_progress)
        self.logger.info(model.comparison_table(rows, eval_data))
        return result

    def _compare(self, key, setting, eval_data, model_file, show_progress):
        """One comparison evaluation; where a caller records evaluations (``per_user_records``, a
        ``stats.recording_per_user`` list), the record this very evaluation added is kept as ``extra_per_user[key]``."""
        records = getattr(self, "per_user_records", None)
        before = None if records is None else len(records)
        with setting():
            out = super().evaluate(eval_data, False, model_file, show_progress)
        if records is not None and len(records) == before + 1:  # exactly one record: this evaluation's
            self.extra_per_user[key] = records[-1]
        return out


class WeaveRec(LLMMerge):
    trainer_class = WeaveTrainer

    @classmethod
    def validate_config(cls, config):
        with_sample_sources(config)
        if not (config["source_domains"] if "source_domains" in config else None):
            raise ConfigError("source_domains is empty: WeaveRec needs at least one source domain "
                              "(e.g. --source_domains=\"[amazon-beauty]\"); for the target-only model use "
                              "--model=LLMRec")
        super().validate_config(config)  # the LLM keys; the sources exist, are distinct and are not the target

    @classmethod
    def validate_merge(cls, config, sources):  # WeaveRec's weave_* keys instead of LLMMerge's merge_* keys
        check_choice(config, "weave_merge", MERGES)
        check_int(config, "weave_target_samples", low=1, allow_none=True)
        check_int(config, "weave_source_samples", low=1, allow_none=True)
        check_number(config, "weave_temperature", low=0, low_open=True)
        check_int(config, "weave_learn_steps", low=1)
        check_int(config, "weave_learn_users", low=1)
        check_number(config, "weave_learn_lr", low=0, low_open=True)
        check_bool(config, "weave_compare_target_only")
        check_bool(config, "weave_compare_baselines")
        given = config["weave_weights"]
        k = len(sources) + 1
        if config["weave_merge"] == "weights":
            if not isinstance(given, list) or len(given) != k or not all(
                    isinstance(w, (int, float)) and not isinstance(w, bool) for w in given):
                raise ConfigError(f"weave_weights={given!r} is not allowed: weave_merge=weights needs {k} numbers "
                                  f"(θ0 = target-only module first, then one per source)")
        elif given is not None:
            raise ConfigError(f"weave_weights is only used by weave_merge=weights (weave_merge="
                              f"{config['weave_merge']!r})")

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.extra_results = {}
        self.module_names = [self.target.name] + [self.hybrid_name(s) for s in self.sources]
        self.merge_weights = None  # [K] mean mixing weights actually used (per module for `learned`)
        self._base_weights = None  # W0 of the adapted weights, kept only for the θ0 comparison
        self._deltas = None
        self._popularity = None  # set inside popularity(): training-split counts of each item as the score

    # --- modules ------------------------------------------------------------------------------------------------
    @classmethod
    def adapter_keys(cls, config):  # θ0 and one hybrid per source
        target = config["dataset"]
        return [target, *(f"{target}{HYBRID_SEP}{s}" for s in domain_list(config, "source_domains", required=True))]

    def hybrid_name(self, source):
        return f"{self.target.name}{HYBRID_SEP}{source}"

    def hybrid_key(self, source):
        return training_key(self.base_name, {self.target.name: self.config["weave_target_samples"],
                                             source: self.config["weave_source_samples"]},
                            self.settings, self.builder, self._num_candidates())

    def hybrid_samples(self, source_domain):
        """θi's training data: ``weave_target_samples`` target samples and ``weave_source_samples`` source
        samples (each drawn reproducibly from its own domain), shuffled together with the run's seed."""
        n, seed = self._num_candidates(), self.config["seed"]
        target = build_samples(self.target, self.config["weave_target_samples"], n, seed)
        source = build_samples(source_domain, self.config["weave_source_samples"], n, seed)
        return mix_samples([target, source], seed)

    def hybrid_adapter(self, source, trainer):
        name = self.hybrid_name(source)
        if name in self.adapter_paths:
            return check_adapter_base(self.adapter_paths[name], self.llm)

        def make_samples():
            domain = self.source_domain(source)
            return self.hybrid_samples(domain), {source: domain}

        return ensure_adapter(self.llm, self.adapter_root / name, make_samples, self.builder, self.domains,
                              self.settings, self.hybrid_key(source), self.show_progress, trainer.logger)

    def default_adapter_root(self, checkpoint_dir):
        """A folder per training setup, so reruns and interrupted runs find the modules they already trained."""
        key = training_key(self.base_name, {"target": self.config["max_train_samples"],
                                            "weave_target": self.config["weave_target_samples"],
                                            "weave_source": self.config["weave_source_samples"]},
                           self.settings, self.builder, self._num_candidates())
        key["seed"] = self.config["seed"]
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return Path(checkpoint_dir) / "weaverec-adapters" / digest

    # --- merging ------------------------------------------------------------------------------------------------
    def prepare(self, trainer):
        if self.config["adapter_dir"]:
            self.adapter_root = Path(os.path.expanduser(self.config["adapter_dir"]))
        else:
            self.adapter_root = self.default_adapter_root(trainer.checkpoint_dir)
        trainer.logger.info(f"WeaveRec modules: {', '.join(self.module_names)} (adapter folder {self.adapter_root})")
        self.load_sources([(self.target.name, [self.target.name], self.domain_key(self.target.name))]
                          + [(self.hybrid_name(s), [self.target.name, s], self.hybrid_key(s)) for s in self.sources])
        folders = [self.domain_adapter(self.target.name, trainer)] + \
                  [self.hybrid_adapter(s, trainer) for s in self.sources]
        self.adapter_folders = dict(zip(self.module_names, folders))
        merging.check_same_base(folders, self.base_name)
        # each module's ΔW is computed from its LoRA factors when it is read, one adapted weight at a time: K dense
        # copies of every adapted weight (0.43 GB each for SmolLM2-135M, 26 GB in fp32 for a 7B model) are never held
        deltas = [merging.lora_deltas(f, base_model=self.llm, lazy=True) for f in folders]
        merging.check_compatible(deltas, self.module_names)  # other target modules -> refused, naming both
        method = self.config["weave_merge"]
        if method == "learned":
            merged = self.learn_merge(deltas, trainer)
        else:
            weights = None if method == "average" else [float(w) for w in self.config["weave_weights"]]
            merged = MergedDeltas(deltas, weights, "average" if weights is None else "weights", names=self.module_names)
            self.merge_weights = [1.0 / len(deltas)] * len(deltas) if weights is None else weights
        if self.config["weave_compare_target_only"]:
            self._deltas = (deltas[0], merged)
            self._base_weights = {k: self.llm.get_submodule(k).weight.detach().to("cpu", copy=True) for k in merged}
        fold_merged(self.llm, merged)
        self.folded = True
        release_memory()  # the modules' factors and the merge's temporaries, before scoring starts
        trainer.logger.info(
            f"merged {len(folders)} WeaveRec modules ({method}; weights "
            + ", ".join(f"{n}={w:.3f}" for n, w in zip(self.module_names, self.merge_weights))
            + ") and folded them into the base weights: "
            + ", ".join(f"{n}={f}" for n, f in self.adapter_folders.items()))

    def validation_users(self, valid_data, limit):
        """(history, candidates, order seed) of up to ``limit`` validation users: their prompts and candidate
        lists only; RecBole's positive-item indices (the labels) are never read."""
        users = []
        for batch in valid_data:
            interaction = batch[0] if isinstance(batch, tuple) else batch
            items = interaction[self.ITEM_ID].cpu()
            for rows, history, seed in self._groups(interaction):
                users.append((history, items[rows].tolist(), seed))
                if len(users) >= limit:
                    return users
        return users

    def candidate_entropy(self, history, candidates, order_seed):
        """Entropy of softmax(scores) over one user's candidates, differentiable in the model's weights."""
        listed = list(dict.fromkeys(int(c) for c in candidates))
        np.random.default_rng([int(self.config["seed"]), int(order_seed)]).shuffle(listed)
        prompt = self.builder.prompt_ids(self._titles(history), self._titles(listed)
                                         if self.builder.prompt_candidates else None)
        answers = [self.builder.answer_ids(self.target.titles[c]) for c in listed]
        scores = score_candidates(self.llm, prompt, answers, pad_id=self.tokenizer.pad_token_id, grad=True)
        logp = torch.log_softmax(scores, dim=0)
        return -(logp.exp() * logp).sum()

    def learn_merge(self, deltas, trainer):
        """λ (one row per adapted module) fitted by entropy minimisation on unlabeled validation prompts."""
        from torch.nn.utils import parametrize
        from tqdm.auto import tqdm

        valid = getattr(trainer, "weave_valid_data", None)
        if not valid:
            raise ConfigError("weave_merge=learned needs the target's validation split (valid data) to fit λ")
        users = self.validation_users(valid, self.config["weave_learn_users"])
        if not users:
            raise ConfigError("weave_merge=learned found no validation users to fit λ on")
        # factor form: the modules' LoRA factors (not K stacked dense ΔW: K x 13 GB for a 7B model) move to the
        # device, and each Linear layer adds Σ_i w_i·(x·A_iᵀ)·B_iᵀ to its output while λ is fitted
        merge = FactorMerge(deltas, self.module_names, init=1.0,
                            temperature=self.config["weave_temperature"]).to(self.device)
        optimizer = torch.optim.Adam(merge.parameters(), lr=self.config["weave_learn_lr"])
        rng = np.random.default_rng([int(self.config["seed"]), 23])
        order, losses = [], []
        self.llm.eval()  # no dropout: the objective is the deployed model's
        with merge.applied(self.llm):
            steps = range(self.config["weave_learn_steps"])
            for step in tqdm(steps, desc="fitting WeaveRec merge weights", unit="step",
                             disable=not self.show_progress):
                if not order:
                    order = list(rng.permutation(len(users)))
                history, candidates, seed = users[order.pop()]
                with parametrize.cached():  # a non-Linear layer's dense ΔW: once per step, not per pass
                    loss = self.candidate_entropy(history, candidates, seed)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
        with torch.no_grad():
            w = merge.weights().detach().float().cpu()
            # the learned rows (one per module), applied lazily like the fixed-weight merges
            merged = MergedDeltas(deltas, merge.key_weights(), "weights", names=self.module_names)
            self.merge_weights = w.mean(0).tolist()
            self.merge_weight_range = list(zip(w.min(0).values.tolist(), w.max(0).values.tolist()))
            self.learned_lambda = merge.lam.detach().cpu()
        del merge  # its device copies of the factors
        n = len(losses)
        head, tail = np.mean(losses[:max(1, n // 4)]), np.mean(losses[-max(1, n // 4):])
        self.learn_entropy = (float(head), float(tail))
        trainer.logger.info(f"learned merge: {n} steps on {len(users)} validation users, candidate entropy "
                            f"{head:.4f} (first quarter) -> {tail:.4f} (last quarter)")
        return merged

    # --- θ0 alone, for the side-by-side comparison ----------------------------------------------------------------
    def target_only(self):
        """The model computes with W0 + ΔW(θ0) inside, and with W0 + merged ΔW again afterwards (both folded
        the same way from the saved W0, so the merged model is restored exactly)."""
        return self._folded_with("target_only", lambda: self._deltas[0])

    def zero_shot(self):
        """The base model alone (W0, no module) inside; the merged model again afterwards."""
        return self._folded_with("zero_shot", dict)

    @contextlib.contextmanager
    def popularity(self):
        """Inside: each candidate's score is its count among the training split's target items (Pop on the same
        users and candidates); the LLM is not run."""
        feat = self.target.train.inter_feat
        # every training interaction once, as RecBole's Pop counts them: the prefixes' targets, plus each user's
        # first item (the history of that user's one-item prefix), which is never a target
        firsts = feat[self.ITEM_SEQ][feat[self.ITEM_SEQ_LEN] == 1, 0]
        items = torch.cat([feat[self.ITEM_ID], firsts]).long()
        self._popularity = torch.bincount(items, minlength=self.n_items).float()
        try:
            yield self
        finally:
            self._popularity = None

    def predict(self, interaction):
        if self._popularity is not None:
            return self._popularity[interaction[self.ITEM_ID].long().cpu()].to(self.device)
        return super().predict(interaction)

    def full_sort_predict(self, interaction):
        if self._popularity is not None:
            n = len(interaction[self.ITEM_SEQ])
            return self._popularity.repeat(n).to(self.device)
        return super().full_sort_predict(interaction)

    @contextlib.contextmanager
    def _folded_with(self, what, deltas):
        """W0 + ``deltas()`` folded inside the block, W0 + the merged ΔW again after it."""
        if self._base_weights is None:
            raise RuntimeError(f"{what}() needs weave_compare_target_only (W0 is not kept otherwise)")
        _, merged = self._deltas

        def refold(deltas):
            with torch.no_grad():
                for key, w0 in self._base_weights.items():
                    self.llm.get_submodule(key).weight.copy_(w0)
            fold_merged(self.llm, deltas)

        refold(deltas())
        try:
            yield self
        finally:
            refold(merged)

    def comparison_table(self, rows, eval_data):
        """One table: a column per model of ``rows`` ({label: RecBole result}), a line per metric."""
        users = len(set(eval_data._dataset.inter_feat[self.USER_ID].tolist()))
        width = max(12, *(len(k) + 1 for k in rows))
        lines = [f"{' vs '.join(rows)} on the same {users} test users and candidates:",
                 f"{'metric':<10}" + "".join(f"{k:>{width}}" for k in rows)]
        for metric in next(iter(rows.values())):
            lines.append(f"{metric:<10}" + "".join(f"{r[metric]:>{width}.4f}" for r in rows.values()))
        return "\n".join(lines)

    def num_parameters(self):
        """Parameters of the evaluated (folded) model: the base model's count."""
        return sum(p.numel() for p in self.llm.parameters())
