"""RecBole's own keys, checked before anything is built or trained: one line naming the key, the value and what is
allowed (RecBole itself raises deep inside, after the fit for ``valid_metric``, or silently scores ``uni0`` as 1.0
on every metric). Also: keys that look like typos of known keys are named in a warning."""
import difflib
import glob
import logging
import os
import re

import math
import numbers

from recbole_weaverec.errors import ConfigError

STATES = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# keys this package reads that are in no YAML file (command-line shortcuts and run() arguments)
EXTRA_KEYS = {"eval_mode", "model", "dataset", "config_files", "nproc", "world_size", "ip", "port", "offset",
              "group_offset", "eval_sample_users", "local_rank", "single_spec"}


def name_list(value):
    """A list of names from a YAML/Python list or a command-line string "[a,b]" (which RecBole leaves a string when
    the names are not Python literals, e.g. amazon-toys)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            return [v.strip().strip("'\"") for v in text[1:-1].split(",") if v.strip()]
        return [text]
    return value


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_topk(topk):
    ks = [topk] if _is_int(topk) else topk
    if not isinstance(ks, (list, tuple)) or not ks or not all(_is_int(k) and k > 0 for k in ks):
        raise ConfigError(f"topk={topk!r} is not allowed: expected a positive integer or a list of them, e.g. [10, 20]")
    return list(ks)


def check_metrics(metrics):
    from recbole.evaluator.register import metric_types

    names = [metrics] if isinstance(metrics, str) else metrics
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(m, str) for m in names):
        raise ConfigError(f"metrics={metrics!r} is not allowed: expected a list of metric names, e.g. [Recall, NDCG]")
    unknown = [m for m in names if m.lower() not in metric_types]
    if unknown:
        raise ConfigError(f"metrics={metrics!r}: unknown metric {unknown[0]!r}; RecBole's metrics are "
                          f"{', '.join(sorted(metric_types))}")
    kinds = {metric_types[m.lower()] for m in names}
    if len(kinds) > 1:
        raise ConfigError(f"metrics={metrics!r} mixes ranking metrics (Recall, NDCG, ...) and value metrics (AUC, "
                          f"LogLoss, ...); RecBole evaluates one kind per run")
    return list(names)


def check_valid_metric(valid_metric, metrics, topk):
    from recbole.evaluator.register import metric_types
    from recbole.utils import EvaluatorType

    if not isinstance(valid_metric, str) or not valid_metric:
        raise ConfigError(f"valid_metric={valid_metric!r} is not allowed: expected a name such as NDCG@10")
    name, _, k = valid_metric.partition("@")
    lowered = [m.lower() for m in metrics]
    if name.lower() not in lowered:
        raise ConfigError(f"valid_metric={valid_metric!r} is not among metrics={metrics!r}: the metric it names "
                          f"must be evaluated (add it to metrics, or choose one of them)")
    # every ranking metric but GAUC is reported at each k (recall@10, itemcoverage@10, ...)
    ranking = metric_types[name.lower()] == EvaluatorType.RANKING and name.lower() != "gauc"
    if ranking and (not k.isdigit() or int(k) not in topk):
        raise ConfigError(f"valid_metric={valid_metric!r} is not allowed: {name} is computed at topk={topk}, so "
                          f"use one of {', '.join(f'{name}@{t}' for t in topk)}")
    if not ranking and k:
        raise ConfigError(f"valid_metric={valid_metric!r} is not allowed: {name} has no @k (write {name})")


def check_eval_mode(mode, where="eval_args.mode"):
    ok = isinstance(mode, str) and (mode in ("full", "labeled") or re.fullmatch(r"(uni|pop)[1-9][0-9]*", mode))
    if not ok:
        raise ConfigError(f"{where}={mode!r} is not allowed: expected full, labeled, uniN or popN with N >= 1 "
                          f"(e.g. uni29: the true item and 29 sampled ones; uni0 would make every metric 1.0)")


def check_eval_args(eval_args):
    if not isinstance(eval_args, dict):
        raise ConfigError(f"eval_args={eval_args!r} is not allowed: expected a mapping such as "
                          f"{{split: {{LS: valid_and_test}}, order: TO, mode: full}}")
    unknown = set(eval_args) - {"split", "order", "group_by", "mode"}
    if unknown:
        raise ConfigError(f"eval_args has unknown key(s) {sorted(unknown)}: allowed are split, order, group_by, mode")
    split = eval_args.get("split")
    if split is not None:
        if not isinstance(split, dict) or len(split) != 1 or next(iter(split)) not in ("RS", "LS"):
            raise ConfigError(f"eval_args.split={split!r} is not allowed: expected {{RS: [0.8, 0.1, 0.1]}} or "
                              f"{{LS: valid_and_test}}")
        kind, value = next(iter(split.items()))
        if kind == "RS" and not (isinstance(value, (list, tuple)) and len(value) == 3 and
                                 all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                     for v in value) and sum(value) > 0):
            raise ConfigError(f"eval_args.split.RS={value!r} is not allowed: expected 3 non-negative "
                              f"ratios, e.g. [0.8, 0.1, 0.1]")
        if kind == "LS" and value not in ("valid_and_test", "valid_only", "test_only"):
            raise ConfigError(f"eval_args.split.LS={value!r} is not allowed: expected valid_and_test, valid_only "
                              f"or test_only")
    if eval_args.get("order", "RO") not in ("RO", "TO"):
        raise ConfigError(f"eval_args.order={eval_args['order']!r} is not allowed: expected RO (random) or TO "
                          f"(by time)")
    if eval_args.get("group_by", "user") not in ("user", "none", None):
        raise ConfigError(f"eval_args.group_by={eval_args['group_by']!r} is not allowed: expected user or none")
    mode = eval_args.get("mode", "full")
    if isinstance(mode, dict):
        unknown = set(mode) - {"valid", "test"}
        if unknown:
            raise ConfigError(f"eval_args.mode has unknown key(s) {sorted(unknown)}: allowed are valid, test")
        for phase, m in mode.items():
            check_eval_mode(m, f"eval_args.mode.{phase}")
    else:
        check_eval_mode(mode)


def check_recbole_keys(final):
    """RecBole's general keys in the merged config, before RecBole's Config reads them."""
    if not _is_int(final.get("seed")) or final["seed"] < 0:
        raise ConfigError(f"seed={final.get('seed')!r} is not allowed: expected a non-negative integer")
    state = final.get("state")
    if not isinstance(state, str) or state.upper() not in STATES:
        raise ConfigError(f"state={state!r} is not allowed: expected one of {', '.join(STATES)}")
    if final.get("eval_mode") is not None:
        check_eval_mode(final["eval_mode"], "eval_mode")
    check_eval_args(final.get("eval_args", {}))
    topk = check_topk(final.get("topk"))
    metrics = check_metrics(final.get("metrics"))
    check_valid_metric(final.get("valid_metric"), metrics, topk)


def _recbole_keys():
    import yaml

    from recbole.config import configurator

    root = os.path.join(os.path.dirname(os.path.dirname(configurator.__file__)), "properties")
    keys = set()
    for file in glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True):
        try:
            with open(file, encoding="utf-8") as f:
                keys |= set(yaml.safe_load(f) or {})
        except (OSError, yaml.YAMLError, TypeError):
            continue
    return keys


def warn_typos(external, known):
    """A key nobody reads that is one or two letters off a known key: probably a typo, say so by name."""
    known = set(known) | _recbole_keys() | EXTRA_KEYS
    for key in external:
        if key in known or key.startswith("_"):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            logging.getLogger("recbole_weaverec").warning(
                f"unknown config key {key!r} is ignored: did you mean {close[0]!r}?")


# --- model settings (one-line errors naming the key, the value and what is allowed) -----------------------------
def check_number(config, key, low=None, high=None, low_open=False, high_open=False):
    """A finite real number within the given bounds (open or closed)."""
    value = config[key]
    lo = "(" if low_open or low is None else "["
    hi = ")" if high_open or high is None else "]"  # an open end never includes infinity
    allowed = f"a number in {lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{key}={value!r} ({type(value).__name__}) is not allowed: expected {allowed}")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is out of range: expected {allowed} (a finite number)")
    bad = ((low is not None and (value < low or (low_open and value == low)))
           or (high is not None and (value > high or (high_open and value == high))))
    if bad:
        raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")
    return value


def check_choice(config, key, choices):
    value = config[key]
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed: expected one of {', '.join(choices)}")
    return value


def check_int(config, key, low=None, allow_none=False):
    """An integer (not a bool) >= ``low``; None too where ``allow_none``; a missing key reads as None."""
    value = config[key] if key in config else None
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key}={value!r} is not allowed: expected an integer"
                          + (f" >= {low}" if low is not None else "") + (" or null" if allow_none else ""))
    if low is not None and value < low:
        raise ConfigError(f"{key}={value!r} is out of range: expected an integer >= {low}")
    return int(value)


def check_bool(config, key):
    if not isinstance(config[key], bool):
        raise ConfigError(f"{key}={config[key]!r} is not allowed: expected true or false")
    return config[key]
