"""Leaderboard: models x target datasets (x source-domain sets) x seeds, one table per evaluation protocol.

    python -m recbole_weaverec.leaderboard --config leaderboards/amazon.yaml [--only MODEL] [--dry-run]

Every cell is one ``quick_start.run(model, dataset, config_dict=...)`` in a fresh Python process: a model that
crashes, leaks memory or hangs (``timeout``) takes only its own cell down, and RecBole's process-wide state
(seeds, logging handlers, torch threads) never leaks from one model into the next. A finished cell is cached under
the hash of everything that defines it, so a rerun (or the rest of an interrupted run) computes only what is missing.

Identical candidates: in ``uniN`` tables every cell draws its evaluation negatives with quick_start's shared sampler
(seeded per phase and user, independent of the model and the batch size) under the table's ``sample_seed`` instead of
the training seed, so every model, and every training seed, ranks the same N sampled items per user.

Outputs in ``output_dir``: ``results.csv`` (one row per cell), ``results.md`` (mean ± std over seeds, best per
column in bold), one PNG bar chart per protocol and metric, and ``cache/`` (cell results and RecBole logs).
"""
import argparse
import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from recbole_weaverec.config import DEFAULT_DATA_PATH

TOP_KEYS = {
    "name": "title of the board",
    "data_path": "folder holding the datasets (relative to the working directory; default: the embedded samples)",
    "output_dir": "where results.csv, results.md, the PNGs and cache/ go",
    "datasets": "target datasets (list)",
    "seeds": "training seeds (list of int)",
    "sample_seed": "seed of the uniN candidate sampling, the same for every model and seed (int)",
    "protocols": "evaluation protocol -> {config, headline, columns}",
    "config": "RecBole/model settings for every cell",
    "models": "list of model entries",
    "timeout": "seconds one cell may run before it is killed (number)",
}
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
}
PROTOCOL_KEYS = {"config", "headline", "columns"}
SOURCE_KEYS = ("source_domains", "merge_domains")
# Set per table (protocols:) or by the grid, never per model: they decide what a number in the table means.
TABLE_ONLY = ("seed", "eval_mode", "eval_args", "data_path", "metrics", "topk", "valid_metric",
              "valid_neg_sample_args", "test_neg_sample_args", "eval_sample_users", "dataset", "model",
              "source_domains", "merge_domains")
NOT_HASHED = ("show_progress", "state")  # presentation only: toggling them keeps the cache
PROTOCOL_RE = re.compile(r"^(full|uni\d+)$")  # popN: RecBole draws those from the global RNG, per model
METRIC_NAMES = {"recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR", "precision": "Precision",
                "map": "MAP", "itemcoverage": "ItemCoverage", "averagepopularity": "AveragePopularity"}
MAX_EXIT = 125


class LeaderboardConfigError(ValueError):
    """A bad leaderboard config: the message names the key and what is allowed."""


# ----------------------------------------------------------------------------------------------------- config
def _fail(msg):
    raise LeaderboardConfigError(msg)


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


def load_config(path):
    """Read and validate a leaderboard YAML; returns the normalised dict. Raises LeaderboardConfigError."""
    path = Path(path)
    if not path.is_file():
        _fail(f"leaderboard config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        _fail(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    cfg = validate_config(raw, default_name=path.stem)
    cfg["source"] = str(path)
    return cfg


def validate_config(raw, default_name="leaderboard"):
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
    cfg["sample_seed"] = raw.get("sample_seed", 2020)
    if not isinstance(cfg["sample_seed"], int) or isinstance(cfg["sample_seed"], bool):
        _fail(f"sample_seed must be an integer, got {cfg['sample_seed']!r}")
    timeout = raw.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        _fail(f"timeout must be a positive number of seconds, got {timeout!r}")
    cfg["timeout"] = timeout
    cfg["config"] = _config_dict(raw.get("config", {}), "config", table=True)

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
    elif any(k in value for k in ("seed", "eval_mode", "data_path", "dataset", "model")):
        key = next(k for k in ("seed", "eval_mode", "data_path", "dataset", "model") if k in value)
        _fail(f"{where}.{key} is set by the grid; use the top-level seeds/protocols/data_path/datasets/models")
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


# ----------------------------------------------------------------------------------------------------- grid
def cell_hash(cell):
    """Hash of everything that defines a cell's result (presentation-only settings excluded)."""
    config = {k: v for k, v in cell["config"].items() if k not in NOT_HASHED}
    key = {"model": cell["model"], "dataset": cell["dataset"], "sources": cell["sources"], "seed": cell["seed"],
           "protocol": cell["protocol"], "config": config}
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def expand_grid(cfg):
    """All cells: protocol x model entry x dataset x source set x seed, each with its merged config dict."""
    cells = []
    for protocol, pspec in cfg["protocols"].items():
        for m in cfg["models"]:
            if protocol not in m["protocols"]:
                continue
            for dataset in m["datasets"]:
                for key, sources, spec in _expand_sources(m, dataset, cfg):
                    for seed in m["seeds"]:
                        config = {**cfg["config"], **pspec["config"], **m["config"]}
                        # eval_args merged key by key, as WeaveConfig does for its layers
                        ea = {**cfg["config"].get("eval_args", {}), **pspec["config"].get("eval_args", {})}
                        if ea:
                            config["eval_args"] = ea
                        config.update({"data_path": cfg["data_path"], "seed": seed, "eval_mode": protocol,
                                       "sample_seed": cfg["sample_seed"]})
                        if key:
                            config[key] = list(sources)
                        cell = {"protocol": protocol, "model": m["model"], "label": m["label"], "dataset": dataset,
                                "sources_key": key, "sources": list(sources), "sources_spec": spec,
                                "seed": seed, "config": config,
                                "available": m["available"]}
                        cell["hash"] = cell_hash(cell)
                        cells.append(cell)
    seen = {}
    for c in cells:
        other = seen.setdefault(c["hash"], c)
        if other is not c:
            _fail(f"models {other['label']!r} and {c['label']!r} are the same model with the same config; "
                  f"remove one or change its config")
    return cells


def _expand_sources(m, dataset, cfg):
    if m["sources"] is None:
        return [(None, [], None)]
    key, sets = m["sources"]
    out = []
    for s in sets:
        spec = s if s in ("others", "all") else None
        if s == "others":
            s = [d for d in cfg["datasets"] if d != dataset]
        elif s == "all":
            s = list(cfg["datasets"])
        if key == "source_domains":
            s = [d for d in s if d != dataset]  # a target is never its own source
        if s and all(s != o[1] for o in out):
            out.append((key, s, spec))
    return out


def sources_label(cell, short=False):
    """The cell's source domains, e.g. 'amazon-beauty+amazon-sports'; ``short``: 'others'/'all' as configured."""
    if not cell["sources"]:
        return "-"
    prefix = "merge " if cell["sources_key"] == "merge_domains" else ""
    if short and cell.get("sources_spec"):
        return f"{prefix}{cell['sources_spec']} ({len(cell['sources'])})"
    return prefix + "+".join(cell["sources"])


# ----------------------------------------------------------------------------------------------------- one cell
def _candidates_seeded_by(quick_start, sample_seed):
    """quick_start's shared evaluation sampler (negatives seeded per phase and user), seeded with the table's
    ``sample_seed`` instead of the training seed: one candidate list per user for every model and seed."""
    shared = quick_start.SharedCandidateSampler

    class TableCandidates(shared):
        def __init__(self, sampler, user_items, n_items, seed, phase):
            super().__init__(sampler, user_items, n_items, sample_seed, phase)

    return shared, TableCandidates


def _history(config):
    from recbole.utils import ModelType

    if config["MODEL_TYPE"] == ModelType.SEQUENTIAL:
        return "train+valid"  # the sequence given for a test item includes the validation item
    return {"train_valid": "train+valid"}.get(config["test_history"] if "test_history" in config else None, "train")


def run_cell(cell, show_progress=False):
    """Run one cell in this process; returns the result row (never raises for a model's failure)."""
    from recbole_weaverec import quick_start

    config_dict = dict(cell["config"])
    sample_seed = config_dict.pop("sample_seed")
    config_dict.setdefault("show_progress", show_progress)
    row = {"status": "failed", "error": "", "metrics": {}, "history": "", "model_type": ""}
    start = time.time()
    try:
        config = quick_start.build_config(cell["model"], cell["dataset"], config_dict=config_dict)
        row["history"] = _history(config)
        row["model_type"] = config["MODEL_TYPE"].name
        shared, table = _candidates_seeded_by(quick_start, sample_seed)
        quick_start.SharedCandidateSampler = table
        try:
            result = quick_start.run(cell["model"], cell["dataset"], config_dict=config_dict, saved=True)
        finally:
            quick_start.SharedCandidateSampler = shared
        row["metrics"] = {k: float(v) for k, v in result["test_result"].items() if isinstance(v, (int, float))}
        row["valid_score"] = float(result["best_valid_score"])
        row["status"] = "ok"
    except Exception as e:  # one line: the type and the first line of the message
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".strip()
    row["wall_s"] = round(time.time() - start, 2)
    return row


def _cell_main(cell_file, result_file, show_progress):
    """Entry point of the child process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _stop_when_orphaned()
    cell = json.loads(Path(cell_file).read_text(encoding="utf-8"))
    row = run_cell(cell, show_progress)
    _atomic_write(result_file, json.dumps(row))
    return 0


def _stop_when_orphaned(poll_s=1.0):
    """The cell runs in its own session (so Ctrl-C at the board reaches only the board, which then kills it); if the
    board dies without that (SIGKILL, OOM killer), this cell terminates itself with SIGTERM, i.e. the run's own
    cleanup, instead of running on as an orphan."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _atomic_write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    _publish(tmp, path)


def _publish(tmp, path):
    """Move a finished temporary file into place with ordinary permissions (mkstemp makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


class SubprocessRunner:
    """Runs a cell in a fresh ``python -m recbole_weaverec.leaderboard --run-cell`` inside a scratch folder (its
    RecBole log is kept in cache/logs, its checkpoint deleted)."""

    def __init__(self, cache_dir, timeout=None, show_progress=True):
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.show_progress = show_progress

    def __call__(self, cell):
        work = self.cache_dir / "work" / cell["hash"]
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "cell.json").write_text(json.dumps(cell), encoding="utf-8")
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                              os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, "-m", "recbole_weaverec.leaderboard", "--run-cell", str(work / "cell.json"),
               "--result", str(work / "result.json")] + ([] if self.show_progress else ["--quiet"])
        start = time.time()
        proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            rc = None
        except BaseException:  # Ctrl-C: the child goes too, and its half-written scratch folder
            _kill(proc)
            shutil.rmtree(work, ignore_errors=True)
            raise
        result = work / "result.json"
        if result.is_file():
            row = json.loads(result.read_text(encoding="utf-8"))
        else:
            why = (f"timed out after {self.timeout:g} s" if rc is None
                   else f"the cell's process died (exit code {rc}{', killed: out of memory?' if rc == -9 else ''})")
            row = {"status": "failed", "error": why, "metrics": {}, "history": "", "model_type": "",
                   "wall_s": round(time.time() - start, 2)}
        logs = sorted((work / "log").rglob("*.log")) if (work / "log").is_dir() else []
        if logs:
            (self.cache_dir / "logs").mkdir(parents=True, exist_ok=True)
            shutil.copy(logs[-1], self.cache_dir / "logs" / f"{cell['hash']}.log")
        shutil.rmtree(work, ignore_errors=True)
        return row


def _kill(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ----------------------------------------------------------------------------------------------------- board
class Leaderboard:
    def __init__(self, cfg, runner=None, show_progress=True):
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        self.cache = self.out / "cache"
        self.cells = expand_grid(cfg)
        self.runner = runner or SubprocessRunner(self.cache, cfg["timeout"], show_progress)

    def cached(self, cell):
        path = self.cache / "cells" / f"{cell['hash']}.json"
        if not path.is_file():
            return None
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(row, dict) and row.get("status") in ("ok", "failed") and isinstance(row.get("metrics"), dict):
                return row
            problem = "not a result row"
        except (OSError, UnicodeDecodeError, ValueError) as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        # a cache must not fail every run until deleted by hand: say which file, and compute the cell again
        print(f"warning: cached cell {path} is corrupt ({problem}); it is computed again", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None

    def select(self, only=None):
        if not only:
            return list(self.cells)
        names = {c["model"] for c in self.cells} | {c["label"] for c in self.cells}
        bad = [o for o in only if o not in names]
        if bad:
            raise LeaderboardConfigError(f"--only {bad[0]!r} is not a model of this board: {', '.join(sorted(names))}")
        return [c for c in self.cells if c["model"] in only or c["label"] in only]

    def dry_run(self, only=None, file=None):
        file = file or sys.stdout
        cells = self.select(only)
        width = max([len(c["label"]) for c in cells] + [5])
        print(f"{len(cells)} cells ({sum(self.cached(c) is not None for c in cells)} cached) -> {self.out}",
              file=file)
        for c in cells:
            state = ("skipped: not installed" if not c["available"]
                     else "cached" if self.cached(c) is not None else "to run")
            print(f"  {c['protocol']:<6} {c['label']:<{width}} {c['dataset']:<16} {sources_label(c):<24} "
                  f"seed={c['seed']:<6} {c['hash']}  {state}", file=file)

    def run(self, only=None):
        """Compute the missing cells of the selection; write the outputs for the whole grid. Returns #failed."""
        from tqdm import tqdm

        todo = [c for c in self.select(only) if c["available"] and self.cached(c) is None]
        fresh = {}
        failed = 0
        bar = tqdm(todo, desc=f"leaderboard {self.cfg['name']}", unit="cell", dynamic_ncols=True)
        try:
            for cell in bar:
                bar.set_postfix_str(f"{cell['protocol']} {cell['label']} {cell['dataset']} seed={cell['seed']}")
                tqdm.write(f"[{cell['protocol']}] {cell['label']} on {cell['dataset']} "
                           f"(sources: {sources_label(cell)}, seed {cell['seed']})", file=sys.stderr)
                row = self.runner(cell)
                fresh[cell["hash"]] = row
                if row["status"] == "ok":
                    _atomic_write(self.cache / "cells" / f"{cell['hash']}.json", json.dumps(row))
                else:
                    failed += 1
                    tqdm.write(f"  failed: {row['error']}", file=sys.stderr)
                self.write_outputs(fresh, charts=False)  # an interrupted run still leaves its tables
        finally:
            bar.close()
            self.write_outputs(fresh)
        return failed

    def rows(self, fresh=None):
        fresh = fresh or {}
        rows = []
        for c in self.cells:
            if not c["available"]:
                r = {"status": "skipped", "error": f"model {c['model']} is not installed yet", "metrics": {}}
            else:
                r = fresh.get(c["hash"]) or self.cached(c) or {"status": "pending", "error": "", "metrics": {}}
            rows.append({"protocol": c["protocol"], "model": c["model"], "label": c["label"],
                         "dataset": c["dataset"], "sources": sources_label(c, short=True),
                         "source_domains": "+".join(c["sources"]), "seed": c["seed"],
                         "status": r["status"], "error": r.get("error", ""), "wall_s": r.get("wall_s", ""),
                         "history": r.get("history", ""), "model_type": r.get("model_type", ""),
                         "valid_score": r.get("valid_score", ""), "hash": c["hash"], "metrics": r["metrics"]})
        return rows

    def write_outputs(self, fresh=None, charts=True):
        """results.csv and results.md; the PNGs too unless ``charts`` is False (matplotlib is slow per cell)."""
        rows = self.rows(fresh)
        self.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, self.out / "results.csv")
        names = write_charts(rows, self.cfg, self.out) if charts else None
        md = render_markdown(rows, self.cfg, charts=names)
        _atomic_write(self.out / "results.md", md)


# ----------------------------------------------------------------------------------------------------- outputs
def metric_name(key):
    """'ndcg@10' -> 'NDCG@10' (RecBole reports metrics in lower case)."""
    base, _, k = key.partition("@")
    return METRIC_NAMES.get(base.lower(), base) + (f"@{k}" if k else "")


def write_csv(rows, path):
    metrics = []
    for r in rows:
        metrics += [m for m in r["metrics"] if m not in metrics]
    fields = ["protocol", "model", "label", "dataset", "source_domains", "seed", "status", "history", "model_type",
              "wall_s", "valid_score", *[metric_name(m) for m in metrics], "error", "hash"]
    with tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=Path(path).parent,
                                     delete=False, suffix=".tmp") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            out = {k: r[k] for k in fields if k in r}
            out.update({metric_name(m): f"{v:.6g}" for m, v in r["metrics"].items()})
            w.writerow(out)
    _publish(f.name, path)


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(rows):
    """(protocol, dataset, label, sources) -> {metrics: {m: (mean, std)}, n, total, wall, history, errors}."""
    groups = {}
    for r in rows:
        key = (r["protocol"], r["dataset"], r["label"], r["sources"])
        g = groups.setdefault(key, {"values": {}, "n": 0, "total": 0, "wall": [], "history": "", "errors": [],
                                    "statuses": set()})
        g["total"] += 1
        g["statuses"].add(r["status"])
        if r["status"] == "ok":
            g["n"] += 1
            g["wall"].append(float(r["wall_s"]))
            g["history"] = r["history"]
            for m, v in r["metrics"].items():
                g["values"].setdefault(m, []).append(v)
        elif r["status"] in ("failed", "skipped") and r["error"] and r["error"] not in g["errors"]:
            g["errors"].append(r["error"])
    for g in groups.values():
        g["metrics"] = {m: mean_std(v) for m, v in g["values"].items()}
    return groups


def _fmt(mean, std, n, digits=4):
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _columns(cfg, protocol, groups):
    spec = cfg["protocols"].get(protocol, {}).get("columns") if cfg else None
    present = []
    for (p, *_), g in groups.items():
        if p == protocol:
            present += [m for m in g["metrics"] if m not in present]
    if spec:
        return [m.lower() for m in spec if m.lower() in present]
    return present


def _headline(cfg, protocol, columns):
    h = (cfg["protocols"].get(protocol, {}).get("headline") if cfg else None) or ""
    if h.lower() in columns:
        return h.lower()
    for pref in ("ndcg@10", "ndcg@5"):
        if pref in columns:
            return pref
    return columns[0] if columns else None


def _bold_best(cells, means):
    """Bold every cell whose mean equals the column's best (higher is better for every ranking metric)."""
    valid = [m for m in means if m is not None]
    if not valid:
        return cells
    best = max(valid)
    return [f"**{c}**" if m is not None and round(m, 4) == round(best, 4) else c for c, m in zip(cells, means)]


def markdown_table(header, body, means_by_col):
    """``body``: rows of strings; ``means_by_col``: column index -> per-row means (None = no value) to bold."""
    body = [list(r) for r in body]
    for col, means in means_by_col.items():
        bolded = _bold_best([r[col] for r in body], means)
        for r, c in zip(body, bolded):
            r[col] = c
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _model_order(rows):
    order = []
    for r in rows:
        if (r["label"], r["sources"]) not in order:
            order.append((r["label"], r["sources"]))
    return order


def render_markdown(rows, cfg=None, charts=None, now=None):
    """The leaderboard as markdown: per protocol a headline table (models x datasets) and one detailed table
    per dataset (mean ± std over seeds, best per column in bold)."""
    groups = aggregate(rows)
    name = cfg["name"] if cfg else "leaderboard"
    now = now or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = sorted({r["seed"] for r in rows})
    command = f"`python -m recbole_weaverec.leaderboard --config {cfg['source']}` " if cfg and cfg.get("source") else ""
    out = [f"# Leaderboard: {name}", "",
           f"Generated {now} by {command}on {machine()}.",
           f"Seeds: {', '.join(map(str, seeds))} (mean ± std over the finished seeds; std is the sample standard "
           f"deviation).", ""]
    if cfg:
        out += [f"uniN candidates: sampled per user with seed {cfg['sample_seed']} for every model and seed, so all "
                f"models of a table rank the same candidates. Test metrics; **bold** = best in its column.", ""]
    out += ["`history` = the interactions a model sees when it scores a test user: `train+valid` for sequential "
            "models (the validation item is the last one of the input sequence) and for our closed-form models "
            "(`test_history: train_valid`); `train` for RecBole's general models (Pop, BPR, LightGCN, recbole:EASE), "
            "which never see the validation item as input.", ""]
    pending = sum(r["status"] == "pending" for r in rows)
    if pending:
        out += [f"_{pending} cell(s) not run yet._", ""]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    for protocol in protocols:
        prow = [r for r in rows if r["protocol"] == protocol]
        datasets = list(dict.fromkeys(r["dataset"] for r in prow))
        columns = _columns(cfg, protocol, groups)
        head = _headline(cfg, protocol, columns)
        desc = ("full ranking of the whole catalogue" if protocol == "full"
                else f"the true item + {protocol[3:]} items sampled uniformly from those the user never interacted with")
        out += [f"## Protocol `{protocol}` ({desc})", ""]
        # models without a finished or failed cell yet are listed, not shown as rows of dashes
        ran = {(r["label"], r["sources"]) for r in prow if r["status"] in ("ok", "failed")}
        models = [m for m in _model_order(prow) if m in ran]
        waiting = [label for label, src in _model_order(prow) if (label, src) not in ran]
        if waiting:
            out += [f"Not run yet (or not installed): {', '.join(dict.fromkeys(waiting))}.", ""]
        if not models:
            continue
        if head:
            out += [f"Test {metric_name(head)}:", ""]
            body, means = [], {}
            for label, src in models:
                line = [label, src]
                for j, d in enumerate(datasets):
                    g = groups.get((protocol, d, label, src))
                    if g and head in g["metrics"]:
                        m, s = g["metrics"][head]
                        line.append(_fmt(m, s, g["n"]))
                        means.setdefault(j + 2, []).append(m)
                    else:
                        line.append(_missing(g))
                        means.setdefault(j + 2, []).append(None)
                body.append(line)
            out += [markdown_table(["model", "sources", *datasets], body, means), ""]
            if charts and (protocol, head) in charts:
                out += [f"![{protocol} {metric_name(head)}]({charts[(protocol, head)]})", ""]
        for d in datasets:
            out += [f"### `{protocol}` · {d}", ""]
            body, means = [], {}
            for label, src in models:
                g = groups.get((protocol, d, label, src))
                if g is None:
                    continue
                line = [label, src, g["history"] or "-"]
                for j, m in enumerate(columns):
                    if m in g["metrics"]:
                        mean, std = g["metrics"][m]
                        line.append(_fmt(mean, std, g["n"]))
                        means.setdefault(j + 3, []).append(mean)
                    else:
                        line.append(_missing(g))
                        means.setdefault(j + 3, []).append(None)
                wall = f"{sum(g['wall']) / len(g['wall']):.0f}" if g["wall"] else "-"
                line += [wall, f"{g['n']}/{g['total']}"]
                body.append(line)
            header = ["model", "sources", "history", *[metric_name(m) for m in columns], "time (s)", "seeds"]
            out += [markdown_table(header, body, means), ""]
            notes = [(label, e) for (p, dd, label, _), g in groups.items() if p == protocol and dd == d
                     for e in g["errors"]]
            for label, e in notes:
                out.append(f"- {label}: {e}")
            if notes:
                out.append("")
    if cfg:
        out += ["## Settings", "", f"- every cell: `{_settings(cfg['config'])}`" if cfg["config"] else "- every cell: -"]
        out += [f"- `{p}` table: `{_settings(spec['config'])}`" for p, spec in cfg["protocols"].items()]
        out += [f"- {m['label']}: `{_settings(m['config'])}`" for m in cfg["models"] if m["config"]]
        out += ["- other settings: each model's defaults (properties/model/NAME.yaml for ours, RecBole's for "
                "its built-ins)"]
    return "\n".join(out).rstrip() + "\n"


def _settings(d):
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _missing(g):
    if g is None:
        return "-"
    if "failed" in g["statuses"]:
        return "failed"
    if "skipped" in g["statuses"]:
        return "n/a"
    return "pending"


def write_charts(rows, cfg, out_dir):
    """One grouped bar chart per protocol and metric (datasets on x, one bar per model, std as error bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(rows)
    charts = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        prow = [r for r in rows if r["protocol"] == protocol]
        datasets = list(dict.fromkeys(r["dataset"] for r in prow))
        models = [m for m in _model_order(prow)
                  if any(groups.get((protocol, d, *m), {}).get("n") for d in datasets)]
        if not models:
            continue
        for metric in _columns(cfg, protocol, groups):
            fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(datasets) * (0.35 * len(models) + 0.6)), 4.2))
            width = 0.8 / len(models)
            cmap = plt.get_cmap("tab20")
            for i, (label, src) in enumerate(models):
                xs, ys, es, seeds = [], [], [], []
                for j, d in enumerate(datasets):
                    g = groups.get((protocol, d, label, src))
                    if g and metric in g["metrics"]:
                        m, s = g["metrics"][metric]
                        xs.append(j - 0.4 + width * (i + 0.5))
                        ys.append(m)
                        es.append(s)
                        seeds.append(g["n"])
                name = label if src == "-" else f"{label} ({src})"
                spread = es if any(n > 1 for n in seeds) else None  # one seed: no error bar
                ax.bar(xs, ys, width, yerr=spread, capsize=2, label=name, color=cmap(i % 20))
            ax.set_xticks(range(len(datasets)))
            ax.set_xticklabels(datasets)
            ax.set_ylabel(f"test {metric_name(metric)}")
            ax.set_title(f"{cfg['name'] if cfg else ''} · protocol {protocol} · {metric_name(metric)}")
            ax.legend(fontsize=7, ncol=2 if len(models) > 6 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            fname = f"{protocol}_{metric_name(metric).replace('@', '-')}.png"
            fig.savefig(Path(out_dir) / fname, dpi=110)
            plt.close(fig)
            charts[(protocol, metric)] = fname
    return charts


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = f"{cpu}, {os.cpu_count()} cores"
    with contextlib.suppress(Exception):
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


# ----------------------------------------------------------------------------------------------------- CLI
def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m recbole_weaverec.leaderboard",
        description="Run a grid of models x datasets x seeds under one evaluation protocol per table; write "
                    "results.csv, results.md and one PNG per metric. Finished cells are cached. The exit code is "
                    "the number of failed cells (2 for a bad config).")
    p.add_argument("--config", help="leaderboard YAML (e.g. leaderboards/sample.yaml)")
    p.add_argument("--only", action="append", metavar="MODEL",
                   help="compute only this model's cells (name or label; repeatable); the tables keep the others' "
                        "cached results")
    p.add_argument("--dry-run", action="store_true", help="print the grid and which cells are cached; run nothing")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite results.csv, results.md and the PNGs from the cached cells")
    p.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    p.add_argument("--output-dir", help="write here instead of the config's output_dir")
    p.add_argument("--run-cell", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.run_cell:
        return _cell_main(args.run_cell, args.result, show_progress=not args.quiet)
    if not args.config:
        print("error: --config FILE is required (e.g. leaderboards/sample.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config)
        if args.output_dir:
            cfg["output_dir"] = str(Path(args.output_dir).resolve())
        board = Leaderboard(cfg, show_progress=not args.quiet)
        board.select(args.only)  # validates --only before anything runs
    except LeaderboardConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        board.dry_run(args.only)
        return 0
    if args.render:
        board.write_outputs()
        print(f"wrote {board.out / 'results.md'} from the cache", file=sys.stderr)
        return 0
    # a plain `kill` of the board stops the running cell too (its process has its own session)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        failed = board.run(args.only)
    except KeyboardInterrupt:
        print("interrupted: finished cells are cached; run again to compute the rest", file=sys.stderr)
        return 130
    print(f"wrote {board.out / 'results.md'} and results.csv ({failed} failed cell(s))", file=sys.stderr)
    return min(failed, MAX_EXIT)


if __name__ == "__main__":
    sys.exit(main())
