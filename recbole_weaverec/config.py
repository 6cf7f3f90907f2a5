"""RecBole's Config, extended to find this package's properties/ and to take command-line overrides explicitly.

Layers, lowest first (as in RecBole): RecBole's own properties -> ours (properties/overall.yaml, model/base/FAMILY.yaml
of a model family such as the LLMs, model/NAME.yaml, dataset/NAME.yaml or dataset/default.yaml) -> config files ->
config_dict -> command-line ``--key=value``.
Unlike RecBole, ``eval_args`` is merged key by key across the layers, so ``eval_args: {mode: uni29}`` keeps the
leave-one-out split of the dataset's defaults instead of silently falling back to RecBole's random split.
"""
import os
from pathlib import Path

from recbole_weaverec import compat  # noqa: F401
from recbole.config import Config

from recbole_weaverec.checks import check_recbole_keys, warn_typos
from recbole_weaverec.distributed import init_device
from recbole_weaverec.errors import ConfigError  # noqa: F401  (re-exported: older imports)
from recbole_weaverec.registry import get_model_class

# inside the package, so that a wheel (pip install ., not only -e) ships every default and the sample data
PROPERTIES = Path(__file__).resolve().parent / "properties"
# every properties file a config of this process looked for (found or not): a leaderboard cell records them, and is
# recomputed when one changes or appears (leaderboard.fingerprint.loaded_code)
DEFAULTS_READ = set()
DEFAULT_DATA_PATH = Path(__file__).resolve().parent / "dataset"
DEFAULT_DATASET = "toys-sample"
MERGED_KEYS = ("eval_args",)  # dict-valued keys merged key by key instead of replaced


def parse_cmd_args(args):
    """``['--k=v', ...]`` -> {k: 'v'} (values still strings; Config converts them as RecBole does)."""
    out = {}
    for arg in args or []:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value")
        key, value = arg[2:].split("=", 1)
        if key in out and out[key] != value:
            raise ConfigError(f"argument --{key} given twice with different values ({out[key]!r}, {value!r})")
        out[key] = value
    return out


def _merge(base, update):
    out = dict(base)
    for key, value in update.items():
        if key in MERGED_KEYS and isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


# what a domain may set for itself (beside its files or in ``domain_settings``): how its files are read and which
# of its fields are item text; everything else (the model, training, evaluation) is the run's
DOMAIN_KEYS = ("USER_ID_FIELD", "ITEM_ID_FIELD", "TIME_FIELD", "RATING_FIELD", "load_col", "unload_col",
               "field_separator", "seq_separator", "title_field", "title_fallback_field", "text_fields")


def domain_settings(config, dataset):
    """``config['domain_settings'][dataset]`` ({domain: {key: value}}, keys from DOMAIN_KEYS), checked."""
    given = config.get("domain_settings")
    if given is None:
        return {}
    if not isinstance(given, dict) or not all(isinstance(k, str) and isinstance(v, dict) for k, v in given.items()):
        raise ConfigError(f"domain_settings={given!r} is not allowed: expected {{domain: {{key: value}}}}, e.g. "
                          f"\"{{'ml-100k': {{'title_field': 'movie_title'}}}}\"")
    for name, keys in given.items():
        unknown = sorted(set(keys) - set(DOMAIN_KEYS))
        if unknown:
            raise ConfigError(f"domain_settings[{name!r}]: {unknown} are not domain settings; allowed: "
                              f"{', '.join(DOMAIN_KEYS)}")
    return given.get(dataset, {})


class WeaveConfig(Config):
    """``Config`` for our models and RecBole's: same constructor plus ``cmd_args`` (a list of ``--key=value``).

    ``sys.argv`` is never read: the CLI passes its extra arguments explicitly, so the Python API behaves the same
    inside pytest, notebooks or other programs.
    """

    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None):
        self._cmd_args = parse_cmd_args(cmd_args)
        for file in config_file_list or []:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"config file not found: {file}")
        super().__init__(model, dataset, config_file_list, config_dict)

    def _load_config_files(self, file_list):
        import yaml

        out = {}
        for file in file_list or []:
            try:
                with open(file, encoding="utf-8") as f:
                    layer = yaml.load(f.read(), Loader=self.yaml_loader)
            except UnicodeDecodeError as e:
                raise ConfigError(f"config file {file} is not UTF-8 text (byte {e.start})") from None
            except yaml.YAMLError as e:
                where = getattr(e, "problem_mark", None)
                line = f" line {where.line + 1}" if where is not None else ""
                problem = getattr(e, "problem", None) or str(e).splitlines()[0]
                raise ConfigError(f"config file {file}{line}: not valid YAML ({problem}); only plain YAML values "
                                  f"are read (no !!python tags)") from None
            if layer is None:
                continue
            if not isinstance(layer, dict):
                raise ConfigError(f"config file {file} holds a {type(layer).__name__}, not a mapping of "
                                  f"key: value lines")
            out.update(layer)
        return out

    def _load_cmd_line(self):
        return self._convert_config_dict(dict(self._cmd_args))

    def _merge_external_config_dict(self):
        merged = {}
        for layer in (self.file_config_dict, self.variable_config_dict, self.cmd_config_dict):
            merged = _merge(merged, layer)
        self.external_config_dict = merged

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise ConfigError("no model given: pass --model=NAME (or model: NAME in a config file)")
        if dataset is None:
            dataset = self.external_config_dict.get("dataset", DEFAULT_DATASET)
        model_class = get_model_class(model)
        return model_class.__name__, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        dataset_file = PROPERTIES / "dataset" / f"{dataset}.yaml"
        if not dataset_file.is_file():
            dataset_file = PROPERTIES / "dataset" / "default.yaml"
        own = [PROPERTIES / "overall.yaml", dataset_file]
        # our model defaults only for our own classes (RecBole's EASE keeps RecBole's EASE.yaml)
        if model_class.__module__.startswith("recbole_weaverec."):
            own.insert(1, PROPERTIES / "model" / f"{model}.yaml")
            family = getattr(model_class, "config_family", None)  # a family's shared keys, below the model's own
            if family:
                own.insert(1, PROPERTIES / "model" / "base" / f"{family}.yaml")
        DEFAULTS_READ.update([*own, PROPERTIES / "dataset" / f"{dataset}.yaml"])  # the dataset's own, even absent
        for file in own:
            if file.is_file():
                with open(file, encoding="utf-8") as f:
                    import yaml

                    layer = yaml.load(f.read(), Loader=self.yaml_loader) or {}
                self.internal_config_dict = _merge(self.internal_config_dict, layer)
                if file == dataset_file:
                    self.parameters["Dataset"] += [k for k in layer if k not in self.parameters["Dataset"]]
        # the domain's own settings, in a YAML file beside its atomic files (its field names, load_col, title field):
        # every model, and every cross-domain model that loads it as a source, reads the domain as it describes itself
        given = self.external_config_dict.get("data_path")
        if given or dataset != "ml-100k":  # (without data_path RecBole reads its own bundled ml-100k)
            beside = Path(os.path.expanduser(str(given or DEFAULT_DATA_PATH))) / dataset / f"{dataset}.yaml"
            if beside.is_file():
                layer = self._load_config_files([str(beside)])
                unknown = sorted(set(layer) - set(DOMAIN_KEYS))
                if unknown:
                    raise ConfigError(f"{beside}: {unknown} are not domain settings; a domain's YAML may set "
                                      f"{', '.join(DOMAIN_KEYS)}")
                self.internal_config_dict = _merge(self.internal_config_dict, layer)
                self.parameters["Dataset"] += [k for k in layer if k not in self.parameters["Dataset"]]

    def _get_final_config_dict(self):
        final = _merge(self.internal_config_dict, self.external_config_dict)
        final = _merge(final, domain_settings(final, self.dataset))
        if "data_path" not in self.external_config_dict:
            final["data_path"] = str(DEFAULT_DATA_PATH)
        # RecBole's overall.yaml samples a training negative, which its own CE-loss models (SASRec, GRU4Rec, ...)
        # refuse; a user who did not ask for negatives gets none.
        if final.get("loss_type") == "CE" and "train_neg_sample_args" not in self.external_config_dict:
            final["train_neg_sample_args"] = None
        # shortcut: eval_mode=uni29 (or full, pop100, ...) sets eval_args.mode
        if final.get("eval_mode") is not None:
            final["eval_args"] = {**final.get("eval_args", {}), "mode": final["eval_mode"]}
        return final

    def _init_device(self):
        # multi-process runs: gloo + CPU without CUDA, nccl + cuda:local_rank with it (RecBole: nccl only)
        init_device(self, super()._init_device)

    def _set_default_parameters(self):
        check_recbole_keys(self.final_config_dict)  # before RecBole reads them (it fails deep inside, or late)
        warn_typos(self.external_config_dict, self.internal_config_dict)
        given = self.external_config_dict.get("data_path")
        super()._set_default_parameters()
        if self.dataset == "ml-100k" and given:  # RecBole swaps in its bundled copy for this name, even over ours
            self.final_config_dict["data_path"] = os.path.join(given, self.dataset)
        data_path = self.final_config_dict["data_path"]
        if not os.path.isdir(data_path):
            raise FileNotFoundError(
                f"dataset {self.dataset!r} not found: no folder {data_path} (set data_path to the folder that "
                f"holds {self.dataset}/{self.dataset}.inter)")
        inter = os.path.join(data_path, f"{self.dataset}.inter")
        if not os.path.isfile(inter):
            raise FileNotFoundError(f"dataset {self.dataset!r} has no interaction file: {inter} not found")
