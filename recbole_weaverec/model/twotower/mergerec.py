"""MergeRec: one text two-tower recommender for many data-isolated domains, by merging per-domain models.

(0) a TextSeqRec is fine-tuned per domain on that domain's own data (or loaded, when saved before);
(1) task vectors τ_k = θ_k − θ_base and a merge initialisation (average | task arithmetic | TIES, peft's rules via
    ``recbole_weaverec.merging``), coefficients per domain ("task") or per domain and layer ("layer");
(2) pseudo-users: every item of each domain as a one-item history, scored by that domain's fine-tuned model;
(3) only the coefficients are learned, by distilling the teachers' scores into the merged model.
No real user interaction of any domain is used in (1)–(3). ``merge_learn: false`` gives the training-free merges.
The merged model is evaluated on every domain of ``merge_domains`` (its own test split and catalogue; or on
``dataset`` alone with ``merge_eval_domains: dataset``); ``dataset`` is the domain reported first (and the one
``run`` returns as test_result). Learned coefficients are kept (``coefficients``) and reused by any later run of
the same merge, whichever domain it reports.
"""
import re
import time
from logging import getLogger

import torch
from recbole.trainer import Trainer
from recbole.utils import dict2str, set_color

from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.crossdomain import domain_list
from recbole_weaverec.checks import check_bool, check_choice, check_int, check_number, name_list
from recbole_weaverec.model.twotower.domains import (DomainModelMismatchError, check_same_encoder,
                                                     domain_text_config, encoder_meta, iter_domain_models,
                                                     text_config)
from recbole_weaverec.model.twotower.textseqrec import TextSeqRec
from recbole_weaverec.model.twotower.trainer import ChunkedEvaluation

MERGE_INITS = ("task_arithmetic", "ties", "average")
GRANULARITIES = ("task", "layer")
LAYER_GROUPINGS = ("others", "modules")
EVAL_DOMAINS = ("all", "dataset")  # test on every merged domain, or on ``dataset`` alone (one board cell per target)
VECTOR_DTYPES = ("float32", "bfloat16")  # storage of the stacked task vectors (stacked.VECTOR_DTYPES)
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.\d+(?=\.|$)")
DEFAULT_COEFFICIENT = {"task_arithmetic": 0.2, "ties": 1.0}  # paper's initial values; average: 1/K


def coefficient_groups(keys, grouping="others"):
    """(group_of {key: column}, group names) for layer-wise coefficients.

    ``others``: one group per encoder layer plus one "others" group for every other parameter (embeddings, norms,
    pooler), as the authors' code; ``modules``: one group per non-layer module (``merging.layer_groups``), where a
    module the loss never reaches (e.g. BERT's pooler) keeps a coefficient without a gradient.
    """
    from recbole_weaverec.merging import layer_groups

    if grouping == "modules":
        return layer_groups(keys)
    group_of, names = {}, []
    for key in keys:
        m = _LAYER.search(key)
        label = key[:m.end()] if m else "others"
        if label not in names:
            names.append(label)
        group_of[key] = names.index(label)
    return group_of, names


class MergeRecTrainer(ChunkedEvaluation, Trainer):
    """Runs steps (0)–(3) in ``fit`` and evaluates the merged model on every domain in ``evaluate``."""

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.pipeline = MergePipeline(self.config, self.model, show_progress)
        self.pipeline.run()
        if saved:
            self._save_checkpoint(0, verbose=verbose)
        result = None
        if valid_data is not None:
            result = ChunkedEvaluation.evaluate(self, valid_data, load_best_model=False, show_progress=show_progress)
            self.best_valid_score = result[self.valid_metric]
        self.best_valid_result = result
        return self.best_valid_score, result

    @torch.no_grad()
    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        """The dataset's own result (returned), then every other merged domain on its own test split (logged and
        kept in ``model.domain_results``)."""
        result = super().evaluate(eval_data, load_best_model, model_file, show_progress)
        pipeline = getattr(self, "pipeline", None)
        if pipeline is None or self.config["merge_eval_domains"] == "dataset":
            return result
        results = {self.config["dataset"]: result}
        results.update(pipeline.evaluate_domains(self.model.tower.encoder.state_dict(), show_progress,
                                                 skip=self.config["dataset"]))
        self.model.domain_results = results
        average = pipeline.log_results(results)
        # run() adds these to its dict (quick_start picks up a model's extra_results)
        self.model.extra_results = {"domain_test_results": results, "average_test_result": average}
        return result


class MergePipeline:
    def __init__(self, config, model, show_progress=False):
        self.config = config
        self.model = model
        self.tconfig = model.text_config
        self.show_progress = show_progress
        self.domains = domain_list(config, "merge_domains", required=True, min_len=2, allow_target=True)
        self.logger = getLogger()
        self.timings = {}
        self.learner = None
        self._domain = {}  # name -> (TextSeqRec of that domain, its test dataloader, its config)

    # ---- per-domain TextSeqRec instances: that domain's item texts and test split, all on the merged encoder ---
    def domain(self, name):
        if name not in self._domain:
            from recbole_weaverec.quick_start import prepare

            dconfig = domain_text_config(self.tconfig, name)
            _, train, _, test = prepare(dconfig)
            # no encoder of its own: teachers and student run on given weights, evaluation on the merged ones
            net = TextSeqRec(dconfig, train._dataset, encoder=self.model.tower.encoder).to(dconfig["device"]).eval()
            self._domain[name] = (net, test, dconfig)
        return self._domain[name]

    def run(self, keep_learner=False):
        """Steps (0)–(3); the merged weights end up in ``self.model``. Each domain's fine-tuned state is read, turned
        into its row of the stacked task vectors and dropped before the next (learning reads each again for its
        teacher); the stacked vectors and the learner go once the merge is built (``keep_learner`` keeps the
        learner, e.g. to inspect or step it, and always learns: saved coefficients are reused only without it)."""
        from recbole_weaverec.model.twotower.coefficients import (coefficients_path, load_coefficients,
                                                                  save_coefficients, state_digest)
        from recbole_weaverec.model.twotower.stacked import VECTOR_DTYPES as TORCH_DTYPES, StackedTaskVectors
        from recbole_weaverec.merging import AdapterMismatchError
        from recbole_weaverec.textembed import resolve_encoder_path

        config = self.config
        learn = bool(config["merge_learn"]) and config["merge_steps"] > 0
        base = self.model.base_state
        keys = [k for k, v in base.items() if v.is_floating_point()]
        group_of, groups = coefficient_groups(keys, config["merge_layer_groups"])
        layer = config["merge_granularity"] == "layer"
        device = next(self.model.parameters()).device
        stacked = StackedTaskVectors(base, keys, len(self.domains), group_of if layer else None, device,
                                     dtype=TORCH_DTYPES[config["merge_vector_dtype"]])
        base_meta = encoder_meta(self.model, "pretrained base encoder")
        first, digests = None, []
        self.timings.update(domain_models_s=0.0, teacher_s=0.0)
        start = time.perf_counter()
        # (0) + (1) domain models, each from its own data only, one at a time -> task vectors
        # (no enumerate: its cached result tuple would keep the previous state alive while the next one is read)
        for d, (state, meta) in iter_domain_models(config, self.tconfig, self.domains, self.show_progress):
            i = self.domains.index(d)
            check_same_encoder(*((base_meta, meta) if first is None else (first, meta)))
            first = first or meta
            try:
                stacked.set_task_vector(i, state, base)
            except AdapterMismatchError as e:
                raise DomainModelMismatchError(f"domain {d!r} does not fine-tune the base encoder "
                                               f"{self.model.encoder_path}: {e}") from None
            if learn:
                digests.append(state_digest(state))
            del state
        self.timings["domain_models_s"] = time.perf_counter() - start
        method = config["merge_init"]
        stacked.prepare(method, config["merge_density"])
        k = len(self.domains)
        value = config["merge_coefficient"]
        if value is None:
            value = DEFAULT_COEFFICIENT.get(method, 1.0 / k)
        coefficients = torch.full((k, len(groups)) if layer else (k,), float(value))
        self.groups = groups

        # (3) learn the coefficients from pseudo-users, or read the ones a run of the same merge learned
        if learn:
            path = None if keep_learner else coefficients_path(
                config, self.tconfig, [domain_text_config(self.tconfig, d) for d in self.domains], digests,
                resolve_encoder_path(self.tconfig["text_encoder_path"]))
            saved = load_coefficients(path, coefficients.shape) if path else None
            if saved is not None:
                coefficients, info = saved
                self.best_valid_step = info.get("best_valid_step")
                self.timings["learn_s"] = 0.0
                self.logger.info(f"MergeRec: reusing the coefficients learned before for this merge: {path}")
            else:
                coefficients = self.learn(stacked, coefficients, self.teachers(device))
                if path:
                    save_coefficients(path, coefficients, {"best_valid_step": getattr(self, "best_valid_step", None),
                                                           "learn_s": self.timings["learn_s"]})
        self.coefficients = coefficients.detach().cpu()
        self.model.tower.encoder.load_state_dict(stacked.state(coefficients.to(device)))
        self.model.invalidate_item_cache()
        for net, _, _ in self._domain.values():
            net.invalidate_item_cache()
        if not keep_learner:
            self.learner = None  # frees the stacked task vectors and the teachers' embeddings
        self.logger.info(set_color("MergeRec coefficients", "blue") + f" ({method}, {config['merge_granularity']}, "
                         f"domains {self.domains}): {self._format_coefficients()}")

    def teachers(self, device):
        """(2) domain k's own fine-tuned model = teacher k: its catalogue embeddings, run on its weights (read again,
        one domain at a time), not loaded as a model."""
        from recbole_weaverec.model.twotower.distill import teacher_embeddings

        start, out = time.perf_counter(), []
        for d, (state, _) in iter_domain_models(self.config, self.tconfig, self.domains, self.show_progress):
            net = self.domain(d)[0]
            params = {k: v.to(device) for k, v in state.items()}
            out.append(teacher_embeddings(net.tower, net.n_items, net.encode_batch_size, params=params))
            del params, state
        self.timings["teacher_s"] = time.perf_counter() - start
        return out

    def _format_coefficients(self):
        c = self.coefficients
        if c.dim() == 1:
            return ", ".join(f"{d}={v:.4f}" for d, v in zip(self.domains, c.tolist()))
        return "; ".join(f"{d}: mean {row.mean():.4f} (min {row.min():.4f}, max {row.max():.4f})"
                         for d, row in zip(self.domains, c))

    def learn(self, stacked, coefficients, teachers):
        from tqdm.auto import tqdm

        from recbole_weaverec.model.twotower.distill import CoefficientLearner

        config = self.config
        start = time.perf_counter()
        towers = [self.domain(d)[0].tower for d in self.domains]
        learner = CoefficientLearner(self.model, stacked, coefficients, towers, teachers, lr=config["merge_lr"],
                                     batch_size=config["merge_batch_size"], kd_weight=config["kd_weight"],
                                     kd_temperature=config["kd_temperature"],
                                     encode_batch_size=self.model.encode_batch_size, seed=config["seed"],
                                     valid_ratio=config["merge_valid_ratio"])
        teachers.clear()  # the learner holds them (on the device) from here
        self.timings["student_items_s"] = time.perf_counter() - start
        start = time.perf_counter()
        losses, self.valid_losses = [], []  # valid_losses: (step, loss on the held-out pseudo-users)
        best = None  # (valid loss, step, coefficients): with held-out pseudo-users the best ones are kept

        def validate(step):
            nonlocal best
            value = learner.valid_loss()
            if value is None:
                return
            self.valid_losses.append((step, value))
            if best is None or value < best[0]:
                best = (value, step, learner.coefficients.detach().clone())
            self.logger.info(f"MergeRec step {step}: held-out distillation loss {value:.4f}")

        steps, every = config["merge_steps"], config["merge_valid_every"]
        validate(0)
        for step in tqdm(range(steps), desc="learning merge coefficients", disable=not self.show_progress):
            losses.append(learner.step())
            if (step + 1) % 50 == 0 or step + 1 == steps:
                self.logger.info(f"MergeRec step {step + 1}/{steps}: distillation loss "
                                 f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if (step + 1) % every == 0 or step + 1 == steps:
                validate(step + 1)
        self.timings["learn_s"] = time.perf_counter() - start
        self.losses = losses
        self.learner = learner
        if best is not None:
            self.best_valid_step = best[1]
            self.logger.info(f"MergeRec keeps the coefficients of step {best[1]} (held-out loss {best[0]:.4f})")
            return best[2]
        return learner.coefficients.detach()

    # ---- evaluation of the merged weights on each domain ---------------------------------------------------
    def evaluate_domains(self, state, show_progress=False, skip=None, domains=None, per_user=None):
        """{domain: test result}; ``per_user`` (a dict) receives {domain: (user ids, {metric: values})}."""
        results = {}
        for d in domains or self.domains:
            if d == skip:
                continue
            records = [] if per_user is not None else None
            results[d] = self.evaluate_state(d, state, show_progress, per_user=records)
            if records:
                per_user[d] = records[-1]
        return results

    @torch.no_grad()
    def evaluate_state(self, name, state, show_progress=False, per_user=None):
        """Domain ``name``'s test result for encoder weights ``state``. The domain towers run the merged model's
        encoder module, so other weights are loaded into it for the evaluation and the merged ones put back.
        ``per_user`` (a list) receives (user ids, {metric: values}) from the evaluation's own scores."""
        from contextlib import nullcontext

        from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer
        from recbole_weaverec.stats import recording_per_user

        net, test, dconfig = self.domain(name)
        encoder = net.tower.encoder
        own = encoder.state_dict()
        other = any(own[k].data_ptr() != v.data_ptr() for k, v in state.items() if k in own)
        kept = {k: v.clone() for k, v in own.items()} if other else None
        try:
            encoder.load_state_dict(state)
            net.invalidate_item_cache()
            trainer = TextSeqRecTrainer(dconfig, net)
            with recording_per_user(trainer) if per_user is not None else nullcontext([]) as records:
                result = trainer.evaluate(test, load_best_model=False, show_progress=show_progress)
            if per_user is not None:
                per_user.extend(records)
            return result
        finally:
            if kept is not None:
                encoder.load_state_dict(kept)
                net.invalidate_item_cache()
                self.model.invalidate_item_cache()

    def log_results(self, results):
        metrics = list(next(iter(results.values())).keys())
        merged = [d for d in results if d in self.domains]
        avg = {m: sum(results[d][m] for d in merged) / len(merged) for m in metrics}
        for d, r in results.items():
            unseen = "" if d in self.domains else " (not merged: unseen domain)"
            self.logger.info(set_color(f"merged model on {d}{unseen}", "yellow") + f": {dict2str(r)}")
        self.logger.info(set_color(f"average over {len(merged)} domains", "yellow") + f": {dict2str(avg)}")
        return avg


class MergeRec(TextSeqRec):
    """A TextSeqRec (for ``dataset``) that holds the merged weights; TextSeqRec settings apply to every domain."""

    trainer_class = MergeRecTrainer

    @classmethod
    def validate_config(cls, config):
        config["merge_domains"] = name_list(config["merge_domains"])  # --merge_domains="[a,b]" from the CLI
        domains = domain_list(config, "merge_domains", required=True, min_len=2, allow_target=True)
        check_choice(config, "merge_init", MERGE_INITS)
        check_choice(config, "merge_granularity", GRANULARITIES)
        check_choice(config, "merge_layer_groups", LAYER_GROUPINGS)
        check_choice(config, "merge_vector_dtype", VECTOR_DTYPES)
        check_choice(config, "merge_eval_domains", EVAL_DOMAINS)
        for key in ("merge_learn", "merge_finetune"):
            check_bool(config, key)
        check_number(config, "merge_density", low=0, high=1, low_open=True)
        if config["merge_coefficient"] is not None:
            check_number(config, "merge_coefficient")
        check_number(config, "kd_weight", low=0)
        check_number(config, "kd_temperature", low=0, low_open=True)
        check_number(config, "merge_lr", low=0, low_open=True)
        check_int(config, "merge_steps", low=0)
        check_int(config, "merge_batch_size", low=1)
        check_number(config, "merge_valid_ratio", low=0, high=1, high_open=True)
        check_int(config, "merge_valid_every", low=1)
        given = config["merge_finetuned"]
        if given is not None and not isinstance(given, (str, dict)):
            raise ConfigError(f"merge_finetuned={given!r} is not allowed: expected a folder or a mapping "
                              f"{{domain: file}}")
        if isinstance(given, dict):
            unknown = sorted(set(given) - set(domains))
            if unknown:
                raise ConfigError(f"merge_finetuned names {unknown}, which are not in merge_domains={domains}")
        text_config(config)  # TextSeqRec's own settings, checked for the dataset domain

    def __init__(self, config, dataset):
        self.validate_config(config)
        tconfig = text_config(config)
        super().__init__(tconfig, dataset)
        self.text_config = tconfig
        self.domain_results = {}
        self.extra_results = None
        # θ_base: the pretrained encoder every domain model starts from (not part of the checkpoint)
        self.base_state = {k: v.detach().clone() for k, v in self.tower.encoder.state_dict().items()}
