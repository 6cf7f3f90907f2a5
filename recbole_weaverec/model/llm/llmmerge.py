"""LLMMerge: one LoRA per domain (target and each source, each trained on its own domain alone), merged without
further training ("model merging" baseline), folded into the base weights and evaluated on the target.

Merging is at the ΔW = (α/r)·B·A level with peft's merge rules (``recbole_weaverec.merging``): ``average``,
``weights`` (given w_i), ``task_arithmetic`` (Σ λ·ΔW_i), ``ties`` (trim to ``merge_density``, elect signs, disjoint
mean). Each merged ΔW is computed from the adapters' LoRA factors and folded one adapted weight at a time on the
model's device (``merging.streaming``), so the merge needs one layer's ΔW of memory, not the model's. Already-trained
per-domain adapters are reused from ``adapter_paths`` (domain -> folder) or ``adapter_dir``.
"""
from recbole_weaverec import merging
from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.crossdomain import domain_list
from recbole_weaverec.checks import check_choice, check_number
from recbole_weaverec.merging.streaming import MergedDeltas, fold_merged
from recbole_weaverec.model.llm.base import LLMRecommender
from recbole_weaverec.compat import release_memory
from recbole_weaverec.model.llm.training import adapter_ready, check_adapter_base, ensure_adapter
from recbole_weaverec.model.llm.samples import build_samples, check_trainable, load_source

METHODS = ("average", "weights", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def merge_weights(config, k):
    """The per-adapter weights of ``merge_method`` (None for average); order: target, then sources."""
    method, given = config["merge_method"], config["merge_weights"]
    if given is not None:
        if method == "average":
            raise ConfigError("merge_weights is not used by merge_method=average (it uses 1/K); "
                              "use merge_method=weights")
        if not isinstance(given, list) or len(given) != k or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) for w in given):
            raise ConfigError(f"merge_weights={given!r} is not allowed: expected {k} numbers (target, then each "
                              f"source)")
        return [float(w) for w in given]
    if method == "average":
        return None
    if method == "weights":
        raise ConfigError(f"merge_method=weights needs merge_weights: {k} numbers (target, then each source)")
    if method == "task_arithmetic":
        return [float(config["merge_lambda"])] * k
    return [1.0] * k  # TIES / DARE: λ=1 on the elected (disjoint-mean) delta, as in the TIES paper


class LLMMerge(LLMRecommender):
    uses_sources = True

    @classmethod
    def validate_config(cls, config):
        super().validate_config(config)
        cls.validate_merge(config, domain_list(config, "source_domains", required=True))

    @classmethod
    def validate_merge(cls, config, sources):
        """The merge's own keys (a subclass with another merge, as WeaveRec, checks its own instead)."""
        check_choice(config, "merge_method", METHODS)
        check_number(config, "merge_density", low=0, high=1, low_open=True)
        check_number(config, "merge_lambda")
        merge_weights(config, len(sources) + 1)

    @classmethod
    def adapter_keys(cls, config):
        return [config["dataset"], *domain_list(config, "source_domains", required=True)]

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.sources = domain_list(config, "source_domains", required=True)
        self.adapter_folders = {}
        self._loaded = {}  # source name -> DomainData, loaded by load_sources before the first module trains

    def domain_adapter(self, name, trainer):
        """The folder of ``name``'s own adapter: given in adapter_paths, found in adapter_dir, or trained now."""
        if name in self.adapter_paths:
            return check_adapter_base(self.adapter_paths[name], self.llm)

        def make_samples():
            domain = self.target if name == self.target.name else self.source_domain(name)
            return build_samples(domain, self.config["max_train_samples"], self._num_candidates(),
                                 self.config["seed"]), {name: domain}

        return ensure_adapter(self.llm, self.adapter_root / name, make_samples, self.builder, self.domains,
                              self.settings, self.domain_key(name), self.show_progress, trainer.logger)

    def load_sources(self, modules):
        """Every domain that a module of this run still has to train on, loaded and checked (files, title fields,
        empty titles, training prefixes) before the first module trains: a bad source fails in seconds, not after
        the target's module. ``modules``: (module name, its domain names, training key); reused modules load
        nothing."""
        for module, names, key in modules:
            if module in self.adapter_paths or adapter_ready(self.adapter_root / module, key):
                continue
            for name in names:
                if name == self.target.name:
                    check_trainable(self.target)
                elif name not in self._loaded:
                    self._loaded[name] = load_source(self.config, name)  # a missing file/field, an empty title
                    check_trainable(self._loaded[name])

    def source_domain(self, name):
        """A source's DomainData: the one load_sources checked (handed over once), else loaded now."""
        return self._loaded.pop(name, None) or load_source(self.config, name)

    def prepare(self, trainer):
        names = [self.target.name, *self.sources]
        self.load_sources([(n, [n], self.domain_key(n)) for n in names])
        folders = [self.domain_adapter(name, trainer) for name in names]
        self.adapter_folders = dict(zip(names, folders))
        merging.check_same_base(folders, self.base_name)
        deltas = [merging.lora_deltas(f, base_model=self.llm, lazy=True) for f in folders]  # factors only
        # merged and folded one adapted weight at a time on the model's device: never every ΔW of the model at once
        merged = MergedDeltas(deltas, merge_weights(self.config, len(folders)), self.config["merge_method"],
                              density=self.config["merge_density"], names=names, seed=self.config["seed"])
        fold_merged(self.llm, merged)
        self.folded = True
        release_memory()  # the modules' factors and the merge's temporaries, before scoring starts
        trainer.logger.info(f"merged {len(folders)} adapters ({self.config['merge_method']}) into the base weights: "
                            + ", ".join(f"{n}={f}" for n, f in self.adapter_folders.items()))
