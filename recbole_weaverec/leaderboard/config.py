"""Reading and validating a board's YAML: the keys allowed where, and the normalised config the grid is built from.
Every mistake raises LeaderboardConfigError naming the key and what is allowed."""
import re
from pathlib import Path

import yaml

from recbole_weaverec.config import DEFAULT_DATA_PATH
from recbole_weaverec.leaderboard.errors import _fail
from recbole_weaverec.leaderboard.grid import expand_grid

TOP_KEYS = {
    "name": "title of the board",
    "data_path": "folder holding the datasets (relative to the working directory; default: the embedded samples)",
    "output_dir": "where results.csv, results.md, the PNGs and cache/ go",
    "datasets": "target datasets (list)",
    "seeds": "training seeds (list of int)",
    "sample_seed": "seed of the evaluated users (eval_sample_users) and the uniN candidates, the same for every "
                   "model and seed (int; --sample-seed overrides it)",
    "protocols": "evaluation protocol -> {config, headline, columns}",
    "config": "RecBole/model settings for every cell",
    "models": "list of model entries",
    "timeout": "seconds one cell may run before it is killed (number)",
    "tuning": "{trials: N, seed: S, storage: URL}: the search of every model entry with a tune: block (the same "
              "budget for each; default 8 trials, seed = sample_seed, SQLite in cache/tune.db)",
}
TUNING_KEYS = ("trials", "seed", "storage")
MODEL_KEYS = {
    "model": "model name (ours, RecBole's, recbole:NAME)",
    "label": "name in the table",
    "config": "settings of this model",
    "seeds": "seeds for this model (e.g. one for a deterministic model)",
    "datasets": "subset of the board's datasets",
    "protocols": "subset of the board's protocols",
    "optional": "skip (not fail) when the model's module is not installed yet",
    "source_domains": "source-domain sets (cross-domain models)",
    "merge_domains": "domain sets to merge (MergeRec)",
    "tune": "search space, tuned on validation: {params: {name: 'TYPE VALUES'}} or {params_file: FILE} "
            "(RecBole's params-file syntax: choice, uniform, quniform, loguniform)",
}
PROTOCOL_KEYS = {"config", "headline", "columns"}
SOURCE_KEYS = ("source_domains", "merge_domains")
# Set per table (protocols:) or by the grid, never per model: they decide what a number in the table means.
TABLE_ONLY = ("seed", "eval_mode", "eval_args", "data_path", "metrics", "topk", "valid_metric",
              "valid_neg_sample_args", "test_neg_sample_args", "eval_sample_users", "eval_sample_seed", "dataset",
              "model", "source_domains", "merge_domains")
# Set by the grid for every cell -> the top-level key that decides it.
GRID_SET = {"seed": "seeds", "eval_mode": "protocols", "data_path": "data_path", "dataset": "datasets",
            "model": "models", "eval_sample_seed": "sample_seed"}
PROTOCOL_RE = re.compile(r"^(full|uni[1-9]\d*)$")  # uni0 would score every model 1.0  # popN: RecBole draws those from the global RNG, per model


def _check_keys(mapping, allowed, where):
    if not isinstance(mapping, dict):
        _fail(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        _fail(f"unknown key {unknown[0]!r} in {where}; allowed: {', '.join(allowed)}")


def _str_list(value, where, allow_empty=False):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) or (
            not value and not allow_empty):
        _fail(f"{where} must be a {'' if allow_empty else 'non-empty '}list of names, got {value!r}")
    return list(value)


def _int_list(value, where):
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                           for v in value):
        _fail(f"{where} must be a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):
        _fail(f"{where} repeats a seed: {value!r}")
    bad = [v for v in value if not 0 <= v < 2**32]
    if bad:  # numpy's generators take 0 .. 2**32 - 1; RecBole would fail inside the cell, after the board started
        _fail(f"{where} has {bad[0]!r}: seeds must be integers from 0 to {2**32 - 1}")
    return list(value)


def _dataset_exists(data_path, name, where):
    inter = Path(data_path) / name / f"{name}.inter"
    if not inter.is_file():
        _fail(f"{where}: dataset {name!r} not found ({inter} does not exist)")


def _check_model_name(name, optional, where):
    """'ok', or 'missing' for a registered model whose module is not installed yet (optional entries only)."""
    from recbole_weaverec.registry import MODELS, available_models, recbole_models

    if name.startswith("recbole:"):
        if name[len("recbole:"):] in recbole_models():
            return "ok"
    elif name in available_models() or name in recbole_models():
        return "ok"
    elif name in MODELS:
        if optional:
            return "missing"
        _fail(f"{where}: model {name!r} is registered but its module is not installed yet; "
              f"add 'optional: true' to skip it until it is")
    _fail(f"{where}: unknown model {name!r}; this package's models: {', '.join(available_models())}; "
          f"RecBole's: any of recbole.model (e.g. SASRec, BPR), or recbole:NAME")


def load_config(path, sample_seed=None):
    """Read and validate a leaderboard YAML (``sample_seed``: the command line's, over the YAML's); returns the
    normalised dict. Raises LeaderboardConfigError."""
    path = Path(path)
    if not path.is_file():
        _fail(f"leaderboard config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        _fail(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    cfg = validate_config(raw, default_name=path.stem, sample_seed=sample_seed)
    cfg["source"] = str(path)
    return cfg


def validate_config(raw, default_name="leaderboard", sample_seed=None):
    _check_keys(raw, TOP_KEYS, "the leaderboard config")
    for key in ("datasets", "models", "protocols"):
        if key not in raw:
            _fail(f"the leaderboard config needs {key!r}")
    cfg = {"name": str(raw.get("name", default_name))}
    cfg["data_path"] = str(Path(raw.get("data_path", DEFAULT_DATA_PATH)).resolve())
    if not Path(cfg["data_path"]).is_dir():
        _fail(f"data_path {str(raw.get('data_path', DEFAULT_DATA_PATH))!r} is not a folder ({cfg['data_path']})")
    cfg["output_dir"] = str(Path(raw.get("output_dir", Path("leaderboards/results") / cfg["name"])).resolve())
    cfg["datasets"] = _str_list(raw["datasets"], "datasets")
    for d in cfg["datasets"]:
        _dataset_exists(cfg["data_path"], d, "datasets")
    cfg["seeds"] = _int_list(raw.get("seeds", [2020]), "seeds")
    where = "sample_seed" if sample_seed is None else "--sample-seed"
    cfg["sample_seed"] = raw.get("sample_seed", 2020) if sample_seed is None else sample_seed
    if not isinstance(cfg["sample_seed"], int) or isinstance(cfg["sample_seed"], bool) or \
            not 0 <= cfg["sample_seed"] < 2**32:
        _fail(f"{where} must be an integer from 0 to {2**32 - 1}, got {cfg['sample_seed']!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        _fail(f"timeout must be a positive number of seconds, got {timeout!r}")
    cfg["timeout"] = timeout
    cfg["config"] = _config_dict(raw.get("config", {}), "config", table=True)
    cfg["tuning"] = _tuning(raw.get("tuning", {}), cfg["sample_seed"])

    protocols = raw["protocols"]
    if isinstance(protocols, list):
        protocols = {p: {} for p in _str_list(protocols, "protocols")}
    if not isinstance(protocols, dict) or not protocols:
        _fail(f"protocols must be a non-empty list or mapping of full | uniN, got {protocols!r}")
    cfg["protocols"] = {}
    for name, spec in protocols.items():
        if not isinstance(name, str) or not PROTOCOL_RE.match(name):
            _fail(f"protocol {name!r} is not allowed: expected full or uniN (e.g. uni29)")
        spec = spec or {}
        _check_keys(spec, PROTOCOL_KEYS, f"protocols.{name}")
        columns = spec.get("columns")
        cfg["protocols"][name] = {
            "config": _config_dict(spec.get("config", {}), f"protocols.{name}.config", table=True),
            "headline": spec.get("headline"),
            "columns": None if columns is None else _str_list(columns, f"protocols.{name}.columns"),
        }
        if spec.get("headline") is not None and not isinstance(spec["headline"], str):
            _fail(f"protocols.{name}.headline must be a metric name like NDCG@10, got {spec['headline']!r}")

    if not isinstance(raw["models"], list) or not raw["models"]:
        _fail("models must be a non-empty list of entries like {model: EASE}")
    cfg["models"] = []
    seen = set()
    for i, entry in enumerate(raw["models"]):
        if isinstance(entry, str):
            entry = {"model": entry}
        where = f"models[{i}]"
        _check_keys(entry, MODEL_KEYS, where)
        if not isinstance(entry.get("model"), str):
            _fail(f"{where} needs 'model: NAME'")
        optional = entry.get("optional", False)
        if not isinstance(optional, bool):
            _fail(f"{where}.optional must be true or false, got {optional!r}")
        m = {"model": entry["model"], "label": str(entry.get("label", entry["model"])), "optional": optional,
             "available": _check_model_name(entry["model"], optional, where) == "ok",
             "config": _config_dict(entry.get("config", {}), f"{where}.config", table=False),
             "seeds": _int_list(entry["seeds"], f"{where}.seeds") if "seeds" in entry else cfg["seeds"],
             "datasets": _subset(entry, "datasets", cfg["datasets"], where),
             "protocols": _subset(entry, "protocols", list(cfg["protocols"]), where),
             "sources": None}
        m["tune"] = _tune_space(entry["tune"], f"{where}.tune", m["config"]) if "tune" in entry else None
        given = [k for k in SOURCE_KEYS if k in entry]
        if len(given) > 1:
            _fail(f"{where} sets both source_domains and merge_domains; a model takes one of them")
        if given:
            m["sources"] = (given[0], _source_sets(entry[given[0]], cfg, f"{where}.{given[0]}"))
        if m["label"] in seen:
            _fail(f"{where}: label {m['label']!r} used twice; give one entry a different 'label'")
        seen.add(m["label"])
        cfg["models"].append(m)
    expand_grid(cfg)  # refuses duplicate cells
    return cfg


def _config_dict(value, where, table):
    if not isinstance(value, dict):
        _fail(f"{where} must be a mapping of RecBole settings, got {value!r}")
    if not table:
        for key in value:
            if key in TABLE_ONLY:
                _fail(f"{where}.{key} cannot be set per model: the board sets it for the whole table "
                      f"(use the top-level config, protocols.NAME.config or seeds)")
    elif any(k in value for k in GRID_SET):
        key = next(k for k in GRID_SET if k in value)
        _fail(f"{where}.{key} is set by the grid; use the top-level {GRID_SET[key]}")
    return dict(value)


def _subset(entry, key, allowed, where):
    if key not in entry:
        return list(allowed)
    values = _str_list(entry[key], f"{where}.{key}")
    bad = [v for v in values if v not in allowed]
    if bad:
        _fail(f"{where}.{key}: {bad[0]!r} is not in the board's {key} ({', '.join(allowed)})")
    return values


def _source_sets(value, cfg, where):
    """A list of domain sets, one grid column each. An element is a dataset name (a one-domain set), a list of
    names, 'others' (the board's datasets minus the target) or 'all' (the board's datasets, target included;
    MergeRec merges every domain). ``[a, b]`` = two runs with one source each; ``[[a, b]]`` = one run with two."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(f"{where} must be a list of domain sets (names, lists of names, 'others' or 'all'), got {value!r}")
    sets = []
    for s in value:
        if s in ("others", "all"):
            sets.append(s)
            continue
        names = _str_list(s, where)
        for n in names:
            _dataset_exists(cfg["data_path"], n, where)
        sets.append(names)
    return sets


def _tuning(value, sample_seed):
    _check_keys(value, TUNING_KEYS, "tuning")
    trials = value.get("trials", 8)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        _fail(f"tuning.trials must be a positive integer, got {trials!r}")
    seed = value.get("seed", sample_seed)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        _fail(f"tuning.seed must be an integer from 0 to {2**32 - 1}, got {seed!r}")
    storage = value.get("storage")
    if storage is not None and (not isinstance(storage, str) or not storage):
        _fail(f"tuning.storage must be a database URL or a file path, got {storage!r}")
    return {"trials": trials, "seed": seed, "storage": storage}


def _tune_space(value, where, model_config):
    """A model entry's ``tune:`` -> its Space; the tuned names must be settings a model may take."""
    from recbole_weaverec.errors import ConfigError
    from recbole_weaverec.tune.space import Space

    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("params", "params_file"):
        _fail(f"{where} must be {{params: {{name: 'TYPE VALUES'}}}} or {{params_file: FILE}}, got {value!r}")
    try:
        if "params_file" in value:
            space = Space.from_file(str(value["params_file"]))
        else:
            space = Space.from_mapping(value["params"], f"{where}.params")
    except ConfigError as e:
        _fail(str(e))
    for name in space.params:
        if name in TABLE_ONLY:
            _fail(f"{where}: {name!r} cannot be tuned: the board sets it for the whole table")
        if name in model_config:
            _fail(f"{where}: {name!r} is both set in config and tuned; remove it from one of them")
    return space
