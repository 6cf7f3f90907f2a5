"""``python -m recbole_weaverec.tune --model=NAME --dataset=D --params_file=FILE [--trials N] [--key=value ...]``:
search a model's hyperparameters on the validation split, each trial one run in a fresh process (as a leaderboard
cell: same runner, same cache key), the study in an SQLite file (or any database URL) so that a killed search
continues where it stopped. Prints the chosen values, their validation score and the chosen run's test metrics."""
import argparse
import json
import os
import signal
import sys

DEFAULT_DIR = "tune"  # like RecBole's log/ and saved/: in the working directory


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m recbole_weaverec.tune",
        description="Tune a model on validation (RecBole's params-file syntax). Extra --key=value arguments are "
                    "RecBole settings of every trial, as for run_recbole_weaverec.py.")
    p.add_argument("--model", "-m", required=True, help="model name (ours or RecBole's; recbole:NAME)")
    p.add_argument("--dataset", "-d", default=None, help="dataset name under data_path (default: toys-sample)")
    p.add_argument("--params_file", required=True,
                   help="one parameter per line: 'reg_weight choice [100,500]', 'learning_rate loguniform -8,0' "
                        "(natural-log bounds), 'dropout uniform 0,0.5', 'n quniform 1,8,1'")
    p.add_argument("--config_files", default=None, help="space-separated YAML files of every trial")
    p.add_argument("--trials", type=int, default=8,
                   help="trials to finish (default 8; an all-choice space: at most its grid, searched exhaustively)")
    p.add_argument("--seed", type=int, default=2020, help="seed of the sampler (default 2020)")
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help=f"the trials' cache, logs and the study (default ./{DEFAULT_DIR}; a leaderboard's cache "
                        f"folder works too: its cells are reused)")
    p.add_argument("--storage", default=None,
                   help="database of the study: a file path or URL (default DIR/tune.db; a shared URL such as "
                        "postgresql://... lets several machines work on one study)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one trial may run (default: no limit)")
    p.add_argument("--quiet", action="store_true", help="no per-trial progress bars")
    return p


def base_cell(config, model):
    """The run this search varies, as a leaderboard cell: the user's settings (files, command line), the absolute
    data_path (trials run in scratch folders), the seeds."""
    from recbole_weaverec.leaderboard.grid import cell_hash

    settings = {k: v for k, v in config.external_config_dict.items() if k not in ("model", "dataset")}
    settings["data_path"] = os.path.dirname(os.path.abspath(config["data_path"]))
    seed = config["seed"]
    sample = config["eval_sample_seed"] if "eval_sample_seed" in config and \
        config["eval_sample_seed"] is not None else seed
    settings.update(seed=seed, sample_seed=sample, eval_sample_seed=sample)
    key = next((k for k in ("source_domains", "merge_domains") if settings.get(k)), None)
    cell = {"protocol": str(config["eval_mode"] or "eval_args"), "model": model, "label": model,
            "dataset": config["dataset"], "sources_key": key, "sources": list(settings[key]) if key else [],
            "sources_spec": None, "seed": seed, "config": settings, "available": True}
    json.dumps(cell)  # a trial's cell travels to its process as JSON
    cell["hash"] = cell_hash(cell)
    return cell


def main(argv=None):
    args, extra = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    from recbole_weaverec.errors import ConfigError
    from recbole_weaverec.leaderboard.config import TABLE_ONLY
    from recbole_weaverec.leaderboard.runner import SubprocessRunner
    from recbole_weaverec.leaderboard.tuning import CellCache, Tuner, with_params
    from recbole_weaverec.quick_start import build_config
    from recbole_weaverec.registry import UnknownModelError
    from recbole_weaverec.tune.space import Space

    try:
        if args.trials < 1:
            raise ConfigError(f"--trials={args.trials} is not allowed: expected a positive integer")
        space = Space.from_file(args.params_file)
        fixed = [n for n in space.params if n in TABLE_ONLY and n not in ("source_domains", "merge_domains")]
        if fixed:
            raise ConfigError(f"{args.params_file}: {fixed[0]!r} cannot be tuned: it decides what the validation "
                              f"score means (tune model settings only)")
        files = args.config_files.split() if args.config_files else None
        config = build_config(args.model, args.dataset, config_file_list=files, cmd_args=extra)
        base = base_cell(config, args.model)
        folder = os.path.abspath(args.dir)  # each trial's process runs in a scratch folder below it
        runner = SubprocessRunner(folder, args.timeout, show_progress=not args.quiet)
        tuner = Tuner(folder, runner, args.trials, args.seed, args.storage)
        print(f"tuning {args.model} on {config['dataset']} by valid {config['valid_metric']}: {args.trials} "
              f"trials, study in {tuner.storage}", file=sys.stderr)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        record = tuner.tune(base, space)
    except (ConfigError, UnknownModelError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished trials are kept; the same command continues the search", file=sys.stderr)
        return 130
    if record["params"] is None:
        print(f"error: {record['error']} (their logs: {os.path.join(args.dir, 'logs')})", file=sys.stderr)
        return 1
    row = CellCache(args.dir).get(with_params(base, record["params"])) or {}
    print(f"chosen after {record['trials']} trials (valid {config['valid_metric']} {record['valid_score']:.4f}):")
    for name, value in record["params"].items():
        print(f"  {name}: {json.dumps(value)}")
    test = ", ".join(f"{k} {v:.4f}" for k, v in row.get("metrics", {}).items())
    print(f"test result of that run: {test or '-'}")
    return 0
