"""Tuning on validation: one Optuna study (``tune.study``) per protocol x model entry x dataset x source set, whose
trials are cells (the cell's config plus the drawn values) run by the board's runner and cached under the same
``cell_hash`` as every other cell. The study chooses by the validation score only; the chosen values are written to
``cache/tuned/<study>.json`` and every seed of the entry then runs with them. The tuned cell of the tuning seed is
the chosen trial itself (same config, same hash), so it is not run twice."""
import contextlib
import hashlib
import json
import sys
from pathlib import Path

from recbole_weaverec.files import write_text
from recbole_weaverec.leaderboard.fingerprint import PACKAGE, code_unchanged, file_digest
from recbole_weaverec.leaderboard.grid import cell_hash
from recbole_weaverec.tune.study import best, search, storage_url

TUNING_CODE = ("tune/space.py", "tune/study.py", "leaderboard/tuning.py")  # decide which values are chosen


class CellCache:
    """``<cache>/cells/<hash>.json``: finished cells (ok rows only: a failure is computed again next time); then the
    board's committed ``archive`` (read only), under the same rule: a row is used only while its code is unchanged."""

    def __init__(self, root, archive=None):
        self.root = Path(root)
        self.archive = archive

    def path(self, cell):
        return self.root / "cells" / f"{cell['hash']}.json"

    def get(self, cell):
        row = self._local(cell)
        if row is None and self.archive is not None:
            row = self.archive.get(cell["hash"])
            if row is not None and not (row.get("status") == "ok" and isinstance(row.get("metrics"), dict)
                                        and code_unchanged(row.get("code"))):
                row = None
        return row

    def _local(self, cell):
        path = self.path(cell)
        if not path.is_file():
            return None
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(row, dict) and row.get("status") in ("ok", "failed") and isinstance(row.get("metrics"), dict):
                if code_unchanged(row.get("code")):
                    return row
                return None  # code it ran has changed since (or a row from before code was recorded): run again
            problem = "not a result row"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # a cache must not fail every run until deleted by hand: say which file, and compute the cell again
        print(f"warning: cached cell {path} is corrupt ({problem}); it is computed again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None

    def put(self, cell, row):
        if row["status"] == "ok":  # compact separators: a row carries one value per test user and metric
            write_text(self.path(cell), json.dumps(row, separators=(",", ":")))


def with_params(cell, params):
    """The cell with the given hyperparameter values in its config (and its own hash)."""
    out = {**cell, "config": {**cell["config"], **params}}
    out["hash"] = cell_hash(out)
    return out


def study_name(base_cell, space, seed):
    """The study's key: the tuning seed's cell (its config, defaults, code and data, as ``cell_hash``), the space,
    the sampler seed and the tuning code. The trial budget is not in it: a larger budget continues the study."""
    code = {name: file_digest(PACKAGE / name) for name in TUNING_CODE}
    blob = json.dumps({"cell": base_cell["hash"], "space": space.describe(), "seed": seed, "code": code},
                      sort_keys=True)
    return "tune-" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


class Tuner:
    def __init__(self, cache_dir, runner, trials, seed, storage=None, archive=None):
        self.cache_dir = Path(cache_dir)
        self.archive = archive
        self.cells = CellCache(self.cache_dir, archive)
        self.runner = runner
        self.trials = trials
        self.seed = seed
        self.storage = storage or str(self.cache_dir / "tune.db")
        self._memo = {}  # record path -> chosen(), for this process (rows() asks once per cell)

    def _record(self, base_cell, space):
        return self.cache_dir / "tuned" / f"{study_name(base_cell, space, self.seed)}.json"

    def chosen(self, base_cell, space):
        """The chosen values of a finished search with at least this budget whose chosen trial is still a valid
        cell (the code and defaults it ran unchanged), or None."""
        path = self._record(base_cell, space)
        if path not in self._memo:
            self._memo[path] = self._read(path, base_cell, space)
        return self._memo[path]

    def _read(self, path, base_cell, space):
        if not path.is_file() and self.archive is not None:  # a search finished on another machine
            path = self.archive.record(path.stem) or path
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            print(f"warning: tuning record {path} is unreadable; the search is continued", file=sys.stderr)
            return None
        if record.get("trials", 0) < min(self.trials, space.size() or self.trials):
            return None
        if record.get("params") is not None and self.cells.get(with_params(base_cell, record["params"])) is None:
            return None  # the trials ran code or defaults that have changed since: the search starts again
        return record

    def _stale(self, base_cell, space):
        """A record whose chosen trial is no longer a valid cell: its study's scores are stale; drop both."""
        import optuna

        path = self._record(base_cell, space)
        if path.is_file() and self.chosen(base_cell, space) is None:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError):
                record = {}
            if record.get("params") is not None and record.get("trials", 0) >= min(self.trials, space.size() or
                                                                                    self.trials):
                with contextlib.suppress(KeyError):
                    optuna.delete_study(study_name=record["study"], storage=storage_url(self.storage))
                path.unlink()

    def tune(self, base_cell, space, log=None):
        """Run (or continue) the search for this cell's entry; returns its record (params, trials, valid score)."""
        log = log or (lambda text: print(text, file=sys.stderr))

        def evaluate(params):
            cell = with_params(base_cell, params)
            row = self.cells.get(cell)
            if row is None:
                row = self.runner(cell)
                self.cells.put(cell, row)
            score = row.get("valid_score") if row["status"] == "ok" else None
            shown = ", ".join(f"{k}={_short(v)}" for k, v in params.items())
            log(f"  trial {shown}: " + (f"valid {score:.4f}" if score is not None else row.get("error", "failed")))
            # the trial keeps where its cell is and whether it ran; never its test metrics
            return score, {"hash": cell["hash"], "status": row["status"], "error": row.get("error", "")}

        self._stale(base_cell, space)
        name = study_name(base_cell, space, self.seed)
        study, budget = search(space, evaluate, trials=self.trials, storage=self.storage, study_name=name,
                               seed=self.seed, maximize=base_cell["config"].get("valid_metric_bigger", True))
        top = best(study)
        if top is None:
            record = {"study": name, "trials": budget, "params": None, "valid_score": None,
                      "error": "every trial failed"}
        else:
            record = {"study": name, "trials": budget, "params": space.decode(top.params),
                      "valid_score": top.value, "trial_hash": top.user_attrs.get("hash"),
                      "space": space.describe()}
        write_text(self._record(base_cell, space), json.dumps(record, indent=1))
        self._memo.clear()
        return record


def _short(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
