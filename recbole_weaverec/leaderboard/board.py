"""``Leaderboard``: a board's cells with their cache; runs the missing ones and writes the report for the whole grid."""
import sys
from pathlib import Path

from recbole_weaverec.leaderboard.archive import Archive
from recbole_weaverec.leaderboard.errors import LeaderboardConfigError
from recbole_weaverec.files import write_text
from recbole_weaverec.leaderboard.grid import expand_grid, sources_label
from recbole_weaverec.leaderboard.report import render_markdown, write_charts, write_csv
from recbole_weaverec.leaderboard.runner import SubprocessRunner
from recbole_weaverec.leaderboard.tuning import CellCache, Tuner, study_name, with_params


class Leaderboard:
    """``tuned=False`` (``--untuned``): every entry with its defaults, written to ``output_dir/untuned``."""

    def __init__(self, cfg, runner=None, show_progress=True, tuned=True):
        self.cfg = cfg
        self.tuned = tuned
        self.cache = Path(cfg["output_dir"]) / "cache"
        self.out = Path(cfg["output_dir"]) / ("" if tuned else "untuned")
        self.cells = expand_grid(cfg)
        self.runner = runner or SubprocessRunner(self.cache, cfg["timeout"], show_progress)
        self.archive = Archive(self.out)  # the committed results: cells computed on other machines count too
        self.store = CellCache(self.cache, self.archive)
        tuning = cfg.get("tuning") or {"trials": 8, "seed": cfg["sample_seed"], "storage": None}
        self.tuner = Tuner(self.cache, self.runner, tuning["trials"], tuning["seed"], tuning["storage"],
                           archive=self.archive)
        self.spaces = {m["label"]: m.get("tune") for m in cfg["models"]}
        self.bases = {}  # an entry's group -> its first seed's cell, the one its search runs on
        for c in self.cells:
            self.bases.setdefault(_group(c), c)

    def cached(self, cell):
        return self.store.get(cell)

    def space(self, cell):
        return self.spaces.get(cell["label"]) if self.tuned else None

    def effective(self, cell):
        """(the cell as it runs: with its entry's chosen values, or None while the search is unfinished; the
        search's record, or None for an entry that is not tuned)."""
        space = self.space(cell)
        if space is None:
            return cell, None
        record = self.tuner.chosen(self.bases[_group(cell)], space)
        if record is None or record.get("params") is None:
            return None, record
        return with_params(cell, record["params"]), record

    def select(self, only=None, protocols=None, datasets=None):
        cells = _keep(self.cells, "dataset", datasets, self.cfg["datasets"], "a dataset")
        cells = _keep(cells, "protocol", protocols, self.cfg["protocols"], "a table")
        if not only:
            return cells
        names = {c["model"] for c in self.cells} | {c["label"] for c in self.cells}
        bad = [o for o in only if o not in names]
        if bad:
            raise LeaderboardConfigError(f"--only {bad[0]!r} is not a model of this board: {', '.join(sorted(names))}")
        return [c for c in cells if c["model"] in only or c["label"] in only]

    def dry_run(self, only=None, file=None, protocols=None, datasets=None):
        file = file or sys.stdout
        cells = self.select(only, protocols, datasets)
        width = max([len(c["label"]) for c in cells] + [5])
        effective = [self.effective(c)[0] for c in cells]
        print(f"{len(cells)} cells ({sum(e is not None and self.cached(e) is not None for e in effective)} cached) "
              f"-> {self.out}", file=file)
        for c in cells:
            eff, record = self.effective(c)
            state = ("skipped: not installed" if not c["available"]
                     else f"to tune ({self.tuner.trials} trials), then run" if eff is None
                     else "cached" if self.cached(eff) is not None else "to run")
            if record and eff is not None:
                state += f" (tuned: {_values(record['params'])})"
                c = eff
            print(f"  {c['protocol']:<6} {c['label']:<{width}} {c['dataset']:<16} {sources_label(c):<24} "
                  f"seed={c['seed']:<6} {c['hash']}  {state}", file=file)

    def run(self, only=None, protocols=None, datasets=None):
        """Compute the missing cells of the selection; write the outputs for the whole grid. Returns #failed."""
        from tqdm import tqdm

        selected = [c for c in self.select(only, protocols, datasets) if c["available"]]
        failed = 0
        searches = list({_group(c): self.bases[_group(c)] for c in selected
                         if self.space(c) is not None and self.effective(c)[0] is None}.values())
        fresh = {}
        bar = None
        try:  # a run stopped during a search still writes its tables and archives the search's finished trials
            for base in searches:  # each tuned entry's search first, on its first seed (validation scores only)
                tqdm.write(f"[{base['protocol']}] tuning {base['label']} on {base['dataset']} "
                           f"(sources: {sources_label(base)}, seed {base['seed']}): {self.tuner.trials} trials",
                           file=sys.stderr)
                record = self.tuner.tune(base, self.space(base), log=lambda text: tqdm.write(text, file=sys.stderr))
                if record["params"] is None:
                    failed += 1
                    tqdm.write(f"  tuning failed: {record['error']}", file=sys.stderr)
                else:
                    tqdm.write(f"  chosen: {_values(record['params'])} (valid {record['valid_score']:.4f})",
                               file=sys.stderr)
            todo = [e for e in (self.effective(c)[0] for c in selected) if e is not None and self.cached(e) is None]
            bar = tqdm(todo, desc=f"leaderboard {self.cfg['name']}", unit="cell", dynamic_ncols=True)
            for cell in bar:
                bar.set_postfix_str(f"{cell['protocol']} {cell['label']} {cell['dataset']} seed={cell['seed']}")
                tqdm.write(f"[{cell['protocol']}] {cell['label']} on {cell['dataset']} "
                           f"(sources: {sources_label(cell)}, seed {cell['seed']})", file=sys.stderr)
                row = self.runner(cell)
                fresh[cell["hash"]] = row
                self.store.put(cell, row)
                if row["status"] != "ok":
                    failed += 1
                    tqdm.write(f"  failed: {row['error']}", file=sys.stderr)
                self.write_outputs(fresh, charts=False)  # an interrupted run still leaves its tables
        finally:
            if bar is not None:
                bar.close()
            self.write_outputs(fresh)
        return failed

    def rows(self, fresh=None, shown=None):
        """One flat row per cell of the grid; ``shown`` (a dict) receives {hash: row} of the finished cells and
        {"tuned": {study: record}} of the searches behind them."""
        fresh = fresh or {}
        shown = {} if shown is None else shown
        shown.setdefault("cells", {})
        shown.setdefault("tuned", {})
        rows = []
        for c in self.cells:
            eff, record = self.effective(c)
            if not c["available"]:
                r = {"status": "skipped", "error": f"model {c['model']} is not installed yet", "metrics": {}}
            elif eff is None:
                r = {"status": "failed" if record else "pending", "metrics": {},
                     "error": f"tuning: {record['error']}" if record else ""}
            else:
                c = eff
                r = fresh.get(c["hash"]) or self.cached(c) or {"status": "pending", "error": "", "metrics": {}}
                if r["status"] == "ok":
                    shown["cells"][c["hash"]] = r
                    if record:
                        shown["tuned"][record["study"]] = record
            tuning = {"tuning": "defaults", "tuned_params": None} if self.space(c) is None else {
                "tuning": f"tuned: {record['trials']} trials" if record else "to tune",
                "tuned_params": record["params"] if record else None}
            rows.append({"protocol": c["protocol"], "model": c["model"], "label": c["label"],
                         "dataset": c["dataset"], "sources": sources_label(c, short=True),
                         "source_domains": "+".join(c["sources"]), "seed": c["seed"],
                         "status": r["status"], "error": r.get("error", ""), "wall_s": r.get("wall_s", ""),
                         "history": r.get("history", ""), "tie_break": r.get("tie_break", ""),
                         "model_type": r.get("model_type", ""), "valid_score": r.get("valid_score", ""),
                         "hash": c["hash"], "metrics": r["metrics"], "per_user": r.get("per_user"), **tuning})
        return rows

    def write_outputs(self, fresh=None, charts=True):
        """results.csv and results.md; unless ``charts`` is False (after each cell of a run: slow), the PNGs and
        the archive of the cells and search records the tables show."""
        shown = {}
        rows = self.rows(fresh, shown)
        self.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, self.out / "results.csv", self.cfg)
        names = write_charts(rows, self.cfg, self.out) if charts else None
        md = render_markdown(rows, self.cfg, charts=names)
        write_text(self.out / "results.md", md)
        if charts:
            self.archive.write({**self.unfinished_trials(), **shown["cells"]}, shown["tuned"])

    def unfinished_trials(self):
        """{hash: row} of the scored trials (in this machine's cache) of the searches that have not finished. They
        are archived with the tables, so a search stopped on one machine goes on from the repository on another:
        the seeded sampler proposes the same values again there (its seed follows the trial count), and each
        archived trial is then found instead of run. Finished searches keep only their chosen trial (a shown cell)."""
        storage = self.tuner.storage
        if not self.tuned or ("://" not in storage and not Path(storage).is_file()):
            return {}
        import optuna
        from optuna.trial import TrialState

        from recbole_weaverec.tune.study import storage_url

        out = {}
        for base in self.bases.values():
            space = self.space(base)
            if space is None or not base["available"] or self.tuner.chosen(base, space) is not None:
                continue
            try:
                study = optuna.load_study(study_name=study_name(base, space, self.tuner.seed),
                                          storage=storage_url(storage))
            except KeyError:  # never started here
                continue
            for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                key = trial.user_attrs.get("hash")
                row = self.store.get({"hash": key}) if isinstance(key, str) else None
                if row is not None and row.get("status") == "ok":
                    out[key] = row
        return out


def _group(cell):
    """The cells that share one search: a protocol x entry x dataset x source set (all its seeds)."""
    return cell["protocol"], cell["label"], cell["dataset"], tuple(cell["sources"])


def _values(params):
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _keep(cells, field, wanted, allowed, what):
    """The cells whose ``field`` is one of ``wanted`` (all when none is asked); a value the board lacks is refused."""
    if not wanted:
        return list(cells)
    bad = [v for v in wanted if v not in allowed]
    if bad:
        raise LeaderboardConfigError(f"--{field} {bad[0]!r} is not {what} of this board: {', '.join(allowed)}")
    return [c for c in cells if c[field] in wanted]
