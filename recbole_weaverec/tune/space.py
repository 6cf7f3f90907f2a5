"""A search space in RecBole's params-file syntax (``name choice [..]``, ``uniform low,high``,
``quniform low,high,q``, ``loguniform low,high`` with natural-log bounds, as hyperopt reads them) and how an Optuna
trial draws from it. Values are parsed as literals only (``safe.read_params_spec``)."""
import ast
import json
import math
from pathlib import Path

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.safe import read_params_spec

KINDS = ("choice", "uniform", "quniform", "loguniform")
NUMBERS = {"uniform": 2, "quniform": 3, "loguniform": 2}
_PLAIN = (type(None), bool, int, float, str)  # what Optuna stores as a categorical value as it is


class Space:
    """``params``: name -> (kind, values); ``values`` a list of choices or the numeric bounds."""

    def __init__(self, params, where):
        if not params:
            raise ConfigError(f"{where}: the search space is empty (expected lines like 'reg_weight choice "
                              f"[100,500]' or 'learning_rate loguniform -8,0')")
        self.params = {}
        for name, (kind, values) in params.items():
            self.params[name] = (kind, _check(name, kind, values, where))

    @classmethod
    def from_file(cls, path):
        if not Path(path).is_file():
            raise ConfigError(f"params file {str(path)!r} not found")
        spec = read_params_spec(path)
        return cls({name: (kind, values) for kind, named in spec.items() for name, values in named.items()},
                   str(path))

    @classmethod
    def from_mapping(cls, mapping, where):
        """``{name: "TYPE VALUES"}``, each value one params-file line without its name (a leaderboard's tune:)."""
        if not isinstance(mapping, dict):
            raise ConfigError(f"{where} must be a mapping like {{reg_weight: 'choice [100,500]'}}, got {mapping!r}")
        params = {}
        for name, text in mapping.items():
            kind, _, raw = str(text).strip().partition(" ")
            raw = raw.replace(" ", "")
            if kind not in KINDS or not raw:
                raise ConfigError(f"{where}.{name}: {text!r} is not 'TYPE VALUES' with TYPE one of "
                                  f"{', '.join(KINDS)} (e.g. 'choice [100,500]', 'loguniform -8,0')")
            try:
                values = ast.literal_eval(raw) if kind == "choice" else [float(v) for v in raw.split(",")]
            except (ValueError, SyntaxError):
                raise ConfigError(f"{where}.{name}: {raw!r} is not a literal list of values") from None
            params[str(name)] = (kind, values)
        return cls(params, where)

    def describe(self):
        """The space as params-file lines (part of a study's cache key and of the report)."""
        return {name: f"{kind} {json.dumps(values)}" for name, (kind, values) in sorted(self.params.items())}

    def grid(self):
        """{name: choices} when every parameter is a choice (searched exhaustively), else None."""
        if all(kind == "choice" for kind, _ in self.params.values()):
            return {name: [_encode(v) for v in values] for name, (_, values) in self.params.items()}
        return None

    def size(self):
        grid = self.grid()
        return math.prod(len(v) for v in grid.values()) if grid else None

    def suggest(self, trial):
        """One configuration drawn by an Optuna trial: {name: value as the model's config takes it}."""
        out = {}
        for name, (kind, values) in self.params.items():
            if kind == "choice":
                out[name] = _decode(trial.suggest_categorical(name, [_encode(v) for v in values]))
            elif kind == "uniform":
                out[name] = trial.suggest_float(name, values[0], values[1])
            elif kind == "quniform":
                out[name] = trial.suggest_float(name, values[0], values[1], step=values[2])
            else:  # hyperopt's loguniform: exp(uniform(low, high))
                out[name] = trial.suggest_float(name, math.exp(values[0]), math.exp(values[1]), log=True)
        return out

    def decode(self, stored):
        """A trial's stored params (``trial.params``) as the model's config takes them."""
        return {name: _decode(v) if self.params[name][0] == "choice" else v for name, v in stored.items()
                if name in self.params}


def _check(name, kind, values, where):
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown parameter type {kind!r} for {name} ({', '.join(KINDS)})")
    if kind == "choice":
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: choice values of {name} must be a non-empty list, got {values!r}")
        return list(values)
    values = list(values)
    if len(values) != NUMBERS[kind] or not all(math.isfinite(v) for v in values) or not values[0] < values[1]:
        form = "low,high,q" if kind == "quniform" else "low,high"
        raise ConfigError(f"{where}: {kind} of {name} needs {form} with low < high, got {values!r}")
    if kind == "quniform" and not values[2] > 0:
        raise ConfigError(f"{where}: quniform step q of {name} must be > 0, got {values[2]!r}")
    return values


def _encode(value):
    """Optuna stores None/bool/int/float/str as they are; anything else (a layer list) as its JSON text."""
    if isinstance(value, _PLAIN):
        return value
    return "json:" + json.dumps(value)


def _decode(value):
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[len("json:"):])
    return value
