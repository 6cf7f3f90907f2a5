"""The command line: ``python -m recbole_weaverec.leaderboard --config BOARD.yaml`` (see ``build_parser``), and the
hidden ``--run-cell`` a SubprocessRunner's child is started with."""
import argparse
import signal
import sys
from pathlib import Path

from recbole_weaverec.leaderboard.board import Leaderboard
from recbole_weaverec.leaderboard.config import load_config
from recbole_weaverec.leaderboard.errors import LeaderboardConfigError
from recbole_weaverec.leaderboard.runner import _cell_main

MAX_EXIT = 125


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
    p.add_argument("--protocol", action="append", metavar="NAME",
                   help="compute only this table's cells (e.g. full; repeatable)")
    p.add_argument("--dataset", action="append", metavar="NAME",
                   help="compute only this target dataset's cells (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the grid and which cells are cached; run nothing")
    p.add_argument("--render", action="store_true",
                   help="run nothing: rewrite results.csv, results.md and the PNGs from the cached cells")
    p.add_argument("--quiet", action="store_true", help="no per-run progress bars")
    p.add_argument("--output-dir", help="write here instead of the config's output_dir")
    p.add_argument("--sample-seed", metavar="N",
                   help="seed of the evaluated users (eval_sample_users) and the uniN candidates of every cell, "
                        f"0 to {2**32 - 1}, instead of the config's sample_seed (cells are cached per sample seed)")
    p.add_argument("--untuned", action="store_true",
                   help="ignore the models' tune: blocks: every entry with its defaults, written to "
                        "OUTPUT_DIR/untuned (the cache is shared)")
    p.add_argument("--run-cell", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p


def _seed(text):
    """--sample-seed's integer (anything else reaches load_config as given, which names it in one line)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.run_cell:
        return _cell_main(args.run_cell, args.result, show_progress=not args.quiet)
    if not args.config:
        print("error: --config FILE is required (e.g. leaderboards/sample.yaml)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, sample_seed=_seed(args.sample_seed))
        if args.output_dir:
            cfg["output_dir"] = str(Path(args.output_dir).resolve())
        board = Leaderboard(cfg, show_progress=not args.quiet, tuned=not args.untuned)
        board.select(args.only, args.protocol, args.dataset)  # validates the filters before anything runs
    except LeaderboardConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        board.dry_run(args.only, protocols=args.protocol, datasets=args.dataset)
        return 0
    if args.render:
        board.write_outputs()
        print(f"wrote {board.out / 'results.md'} from the cache", file=sys.stderr)
        return 0
    # a plain `kill` of the board stops the running cell too (its process has its own session)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        failed = board.run(args.only, args.protocol, args.dataset)
    except KeyboardInterrupt:
        print("interrupted: finished cells are cached; run again to compute the rest", file=sys.stderr)
        return 130
    print(f"wrote {board.out / 'results.md'} and results.csv ({failed} failed cell(s))", file=sys.stderr)
    return min(failed, MAX_EXIT)
