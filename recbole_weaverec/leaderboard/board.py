"""``Leaderboard``: a board's cells with their cache; runs the missing ones and writes the report for the whole grid."""
import json
import sys
from pathlib import Path

from recbole_weaverec.leaderboard.errors import LeaderboardConfigError
from recbole_weaverec.files import write_text
from recbole_weaverec.leaderboard.grid import expand_grid, sources_label
from recbole_weaverec.leaderboard.report import render_markdown, write_charts, write_csv
from recbole_weaverec.leaderboard.runner import SubprocessRunner


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
                    # compact separators: a row carries one value per test user and metric
                    write_text(self.cache / "cells" / f"{cell['hash']}.json", json.dumps(row, separators=(",", ":")))
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
                         "history": r.get("history", ""), "tie_break": r.get("tie_break", ""),
                         "model_type": r.get("model_type", ""), "valid_score": r.get("valid_score", ""),
                         "hash": c["hash"], "metrics": r["metrics"], "per_user": r.get("per_user")})
        return rows

    def write_outputs(self, fresh=None, charts=True):
        """results.csv and results.md; the PNGs too unless ``charts`` is False (matplotlib is slow per cell)."""
        rows = self.rows(fresh)
        self.out.mkdir(parents=True, exist_ok=True)
        write_csv(rows, self.out / "results.csv")
        names = write_charts(rows, self.cfg, self.out) if charts else None
        md = render_markdown(rows, self.cfg, charts=names)
        write_text(self.out / "results.md", md)
