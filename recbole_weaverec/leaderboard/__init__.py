"""Leaderboard: models x target datasets (x source-domain sets) x seeds, one table per evaluation protocol.

    python -m recbole_weaverec.leaderboard --config leaderboards/amazon.yaml [--only MODEL] [--dry-run]

Every cell is one ``quick_start.run(model, dataset, config_dict=...)`` in a fresh Python process: a model that
crashes, leaks memory or hangs (``timeout``) takes only its own cell down, and RecBole's process-wide state
(seeds, logging handlers, torch threads) never leaks from one model into the next. A finished cell is cached under
the hash of everything that defines it, so a rerun (or the rest of an interrupted run) computes only what is missing.

Identical users and candidates: in ``uniN`` tables every cell draws its evaluation negatives with quick_start's
shared sampler (seeded per phase and user, independent of the model and the batch size) under the table's
``sample_seed`` instead of the training seed, and ``eval_sample_users`` keeps users drawn with that seed too
(``eval_sample_seed``), so every model, and every training seed, ranks the same N sampled items of the same users.

Outputs in ``output_dir``: ``results.csv`` (one row per cell), ``results.md`` (headline tables: mean ± 95% interval
over users, the best bold only when a paired bootstrap over users finds it better than the runner-up; detailed
tables: mean ± std over seeds), one PNG bar chart per protocol and metric (95% intervals as error bars), and
``cache/`` (cell results with their per-user metrics, RecBole logs).

Layers, each module importing only those above it in this list (files are written with ``recbole_weaverec.files``):

- ``errors``: LeaderboardConfigError (a bad board config or ``--only``).
- ``fingerprint``: what a cache key covers beyond the cell's config: defaults, code, dataset file contents.
- ``grid``: the cells of a board and their cache keys (``expand_grid``, ``cell_hash``).
- ``config``: reading and validating the board YAML (``load_config``, ``validate_config``).
- ``runner``: one cell, in this process (``run_cell``) or in a fresh one (``SubprocessRunner``); a finished cell keeps
  each test user's metrics (``per_user``: user tokens and one value per user and metric).
- ``significance``: per-user values averaged over seeds, their 95% interval, the paired test of a column's best.
- ``report``: results.csv, results.md and the PNG bar charts from the result rows.
- ``board``: ``Leaderboard``, the grid with its cache: runs what is missing, writes the report.
- ``cli``: the command line (``python -m recbole_weaverec.leaderboard`` runs ``cli.main`` via ``__main__``).
"""
from recbole_weaverec.leaderboard.board import Leaderboard
from recbole_weaverec.leaderboard.cli import MAX_EXIT, build_parser, main
from recbole_weaverec.leaderboard.config import (MODEL_KEYS, PROTOCOL_KEYS, PROTOCOL_RE, SOURCE_KEYS, TABLE_ONLY,
                                                 TOP_KEYS, load_config, validate_config)
from recbole_weaverec.leaderboard.errors import LeaderboardConfigError
from recbole_weaverec.leaderboard.grid import NOT_HASHED, cell_hash, expand_grid, sources_label
from recbole_weaverec.leaderboard.report import (METRIC_NAMES, aggregate, machine, markdown_table, mean_std,
                                                 metric_name, render_markdown, write_charts, write_csv)
from recbole_weaverec.leaderboard.runner import SubprocessRunner, run_cell

__all__ = ["Leaderboard", "LeaderboardConfigError", "MAX_EXIT", "METRIC_NAMES", "MODEL_KEYS", "NOT_HASHED",
           "PROTOCOL_KEYS", "PROTOCOL_RE", "SOURCE_KEYS", "SubprocessRunner", "TABLE_ONLY", "TOP_KEYS", "aggregate",
           "build_parser", "cell_hash", "expand_grid", "load_config", "machine", "main", "markdown_table",
           "mean_std", "metric_name", "render_markdown", "run_cell", "sources_label", "validate_config",
           "write_charts", "write_csv"]
