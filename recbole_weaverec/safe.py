"""Nothing that a user, a config value or a file on disk controls is unpickled or evaluated as code.

RecBole 1.2.1 does both, and this module replaces those places (installed once, from the package's ``__init__``):

- ``create_dataset`` and ``load_split_dataloaders`` ``pickle.load`` ``saved/<dataset>-<Class>.pth``,
  ``saved/<dataset>-for-<model>-dataloader.pth``, ``dataset_save_path`` and ``dataloaders_save_path`` whenever those
  files exist, whatever ``save_dataset`` says: a planted file runs code on a plain run. Here the dataset is always
  built from the atomic files and split again (a warning names an ignored file); saving is left as RecBole does it.
- ``Config._convert_config_dict`` passes every string value (command line, ``config_dict``, leaderboard YAML values)
  through ``eval()``. Here a string becomes a Python literal (``ast.literal_eval``), ``true``/``false`` a bool, a
  bare word or path stays a string (where RecBole's eval failed with NameError), and anything that would compute
  (``1/0``, ``().x``, a call) is refused in one line naming the key.
- Config files are read with a ``SafeLoader`` (RecBole's ``FullLoader`` builds ``!!python/name:os.system``).
- RecBole's hyper-parameter file parser ``eval``s its ``choice`` lists; KD_DAGFM ``eval``s its ``teacher`` key;
  LDiffRec loads ``item_emb.npy`` with ``allow_pickle=True``. Each is replaced by a literal / name / no-pickle read.
"""
import ast
import logging
import re
import sys

import yaml

from recbole_weaverec.errors import ConfigError

# AST nodes that only describe data; any other node (a call, a subscript, a lambda, ...) is code
_DATA_NODES = (ast.Expression, ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.Set, ast.Name, ast.Load,
               ast.UnaryOp, ast.BinOp, ast.USub, ast.UAdd, ast.Sub, ast.Div, ast.Attribute, ast.Add,
               ast.Mult, ast.Mod, ast.Pow, ast.FloorDiv, ast.BitOr, ast.BitAnd, ast.BitXor, ast.Invert,
               ast.MatMult, ast.Compare, ast.Eq, ast.Lt, ast.Gt, ast.LtE, ast.GtE, ast.NotEq, ast.BoolOp,
               ast.Or, ast.And, ast.Not)


def parse_value(key, text):
    """A config string -> its value, as RecBole's ``eval`` gave it for data, never running code.

    ``'1e-3'`` -> 0.001, ``'[1, 2]'`` -> [1, 2], ``'True'``/``'true'`` -> True, ``'None'`` -> None,
    ``'amazon-toys'``, ``'uni29'``, ``'../data'``, ``'[a,b]'`` -> the string itself (RecBole: NameError -> string).
    """
    if not isinstance(text, str):
        return text
    stripped = text.strip()
    try:
        value = ast.literal_eval(stripped)
        if value is None or isinstance(value, (str, int, float, list, tuple, dict, bool)):
            return value
        return text  # e.g. a set or complex: RecBole keeps the string too
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if stripped.lower().lstrip("+-.") in ("inf", "infinity", "nan"):  # as YAML's .inf / .nan: a float
        return float(stripped.lower().replace(".", ""))
    if stripped.startswith("[") and stripped.endswith("]") and not any(c in stripped[1:-1] for c in "[](){}'\""):
        # "[amazon-beauty,amazon-sports]", "[title,brand]": a list of words, as in RecBole's YAML lists
        return [parse_value(key, v.strip()) for v in stripped[1:-1].split(",") if v.strip()]
    try:
        tree = ast.parse(stripped, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return text  # not Python at all: a path, a sentence, a template
    nodes = list(ast.walk(tree))
    names = [n.id for n in nodes if isinstance(n, ast.Name)]
    if all(isinstance(n, _DATA_NODES) for n in nodes):
        if names:
            return text  # words joined by '-', '.', '/': a dataset name, a file, a path (never evaluated)
        raise ConfigError(
            f"{key}={text!r} is an expression, not a value: write the value itself (e.g. 0.5, 1e-3, [1, 2], "
            f"'some text' in quotes); config values are never evaluated")
    raise ConfigError(
        f"{key}={text!r} is not allowed: it looks like code (a call, subscript or lambda) and config values are "
        f"never evaluated; write a number, a list, true/false or a quoted string")


def convert_config_dict(config_dict):
    """Drop-in for ``Config._convert_config_dict``: every string value through ``parse_value``."""
    for key in config_dict:
        config_dict[key] = parse_value(key, config_dict[key])
    return config_dict


class SafeConfigLoader(yaml.SafeLoader):
    """SafeLoader that also reads RecBole's float spellings (``1e-3``, ``.inf``) as floats."""


SafeConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _build_dataset(config):
    """RecBole's ``create_dataset`` without its ``pickle.load`` of a saved dataset file."""
    import importlib
    import os

    from recbole.utils import ModelType

    module = importlib.import_module("recbole.data.dataset")
    name = config["model"] + "Dataset"
    if hasattr(module, name):
        dataset_class = getattr(module, name)
    else:
        dataset_class = getattr(module, {
            ModelType.SEQUENTIAL: "SequentialDataset", ModelType.KNOWLEDGE: "KnowledgeBasedDataset",
        }.get(config["MODEL_TYPE"], "Dataset"))
    saved = config["dataset_save_path"] or os.path.join(
        config["checkpoint_dir"], f'{config["dataset"]}-{dataset_class.__name__}.pth')
    if os.path.exists(saved):
        logging.getLogger().warning(
            f"ignoring saved dataset file {saved}: recbole-weaverec never unpickles files; the dataset is built "
            f"from the atomic files")
    dataset = dataset_class(config)
    if config["save_dataset"]:
        dataset.save()
    return dataset


def _no_saved_dataloaders(config):
    """RecBole's ``load_split_dataloaders``: the saved file is never unpickled, the split is made again."""
    import os

    saved = config["dataloaders_save_path"] or os.path.join(
        config["checkpoint_dir"], f'{config["dataset"]}-for-{config["model"]}-dataloader.pth')
    if os.path.exists(saved):
        logging.getLogger().warning(
            f"ignoring saved dataloader file {saved}: recbole-weaverec never unpickles files; the split is made "
            f"again from the dataset")
    return None


def _space_from_file(file):
    """RecBole's hyper-parameter file (``name type values`` per line) read without ``eval``."""
    from recbole.trainer.hyper_tuning import HyperTuning

    return HyperTuning._build_space_from_dict(read_params_spec(file))


def read_params_spec(file):
    """A RecBole params file as RecBole's ``params_dict`` layout, ``{type: {name: values}}``, parsed as literals
    (also read by ``python -m recbole_weaverec.tune``)."""
    spec = {}
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split(" ")
            if len(parts) < 3:
                continue
            name, kind, raw = parts[0], parts[1], "".join(parts[2:])
            where = f"{file}:{lineno}"
            if kind == "choice":
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    raise ConfigError(f"{where}: choice values {raw!r} of {name} are not a literal list "
                                      f"(e.g. [0.1,0.5] or ['a','b'])") from None
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"{where}: choice values {raw!r} of {name} are not a list (e.g. [0.1,0.5] "
                                      f"or ['a','b'])")
            elif kind in ("uniform", "quniform", "loguniform"):
                form = "low,high,q" if kind == "quniform" else "low,high"
                try:
                    value = [float(v) for v in raw.split(",")]
                except ValueError:
                    raise ConfigError(f"{where}: {kind} bounds {raw!r} of {name} are not numbers ({form})") from None
                if len(value) != len(form.split(",")):
                    raise ConfigError(f"{where}: {kind} of {name} takes {form}, got {raw!r}")
            else:
                raise ConfigError(f"{where}: unknown parameter type {kind!r} (choice, uniform, quniform, "
                                  f"loguniform)")
            spec.setdefault(kind, {})[name] = list(value)
    return spec


class _NoPickleNumpy:
    """numpy as seen by LDiffRec: ``load`` never unpickles."""

    def __init__(self, np):
        self._np = np

    def __getattr__(self, name):
        return getattr(self._np, name)

    def load(self, *args, **kwargs):
        kwargs["allow_pickle"] = False
        return self._np.load(*args, **kwargs)


def check_model_specific(config):
    """Keys that RecBole models ``eval``: only known names pass."""
    if str(config["model"]) == "KD_DAGFM":
        teacher = config["teacher"]
        if not isinstance(teacher, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", teacher):
            raise ConfigError(f"teacher={teacher!r} is not allowed: expected a model class name such as DCNV2")


def install():
    from recbole.config import configurator
    from recbole.data import utils as data_utils
    import recbole.data as data_pkg
    from recbole.model.general_recommender import ldiffrec
    from recbole.model.context_aware_recommender import kd_dagfm
    from recbole.trainer import hyper_tuning

    Config = configurator.Config
    Config._convert_config_dict = lambda self, config_dict: convert_config_dict(config_dict)
    Config._build_yaml_loader = lambda self: SafeConfigLoader
    data_utils.create_dataset = data_pkg.create_dataset = _build_dataset
    data_utils.load_split_dataloaders = data_pkg.load_split_dataloaders = _no_saved_dataloaders
    for name in ("recbole.quick_start.quick_start", "recbole.quick_start"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "create_dataset"):
            module.create_dataset = _build_dataset
    hyper_tuning.HyperTuning._build_space_from_file = staticmethod(_space_from_file)
    if not isinstance(ldiffrec.np, _NoPickleNumpy):
        ldiffrec.np = _NoPickleNumpy(ldiffrec.np)
    original_kd_init = kd_dagfm.KD_DAGFM.__init__

    def kd_init(self, config, dataset):
        check_model_specific(config)
        original_kd_init(self, config, dataset)

    if not getattr(kd_dagfm.KD_DAGFM.__init__, "_weaverec_checked", False):
        kd_init._weaverec_checked = True
        kd_dagfm.KD_DAGFM.__init__ = kd_init
