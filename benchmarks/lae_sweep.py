"""Closed-form sweep vs separate runs (issue 18.3): k log-spaced values of one hyperparameter of EASE / RLAE / RDLAE
/ L3AE, (a) as k separate normal runs (``quick_start.run``: each its own config, dataset, fit and evaluation, one
after another in this process) and (b) as one ``sweep`` (one dataset and Gram matrix, k solves); the metrics of
every point must agree to 1e-6. Goal: (a)/(b) >= 3 for k = 8 on amazon-sports.

    python benchmarks/lae_sweep.py [--model EASE] [--k 8] [--dataset amazon-sports] [--data-path ../shared/data]
                                   [--param reg_weight] [--low 20] [--high 2000] [--set KEY=VALUE ...]

(b) runs first, so the cold file cache (and, for L3AE, encoding the item texts when they are not cached yet) is
charged to the sweep, not to the separate runs. Each phase's peak RSS is read from VmHWM, reset before the phase.
Logs and checkpoints of the runs go to a temporary folder. The section "Closed-form sweeps (benchmarks/lae_sweep.py)"
of RESULTS.md is rewritten; the script exits 1 when a metric differs.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.results import write_section  # noqa: E402

SECTION = "Closed-form sweeps (benchmarks/lae_sweep.py)"
SAMPLES = REPO / "recbole_weaverec" / "dataset"
TOL = 1e-6
# the swept λ and its default range per model (L3AE: λ_E, with the default λ_X = -100 the sum must stay > 0)
DEFAULT_PARAM = {"EASE": ("reg_weight", 20.0, 2000.0), "RLAE": ("reg_weight", 20.0, 2000.0),
                 "RDLAE": ("reg_weight", 20.0, 2000.0), "L3AE": ("reg_weight_e", 150.0, 5000.0)}


def _status_gib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 2**20 for line in f if line.startswith(key))


def _reset_peak():
    """VmHWM restarts from the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _timed(fn):
    reset = _reset_peak()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, _status_gib("VmHWM"), reset


def separate_runs(model, dataset, grid, config):
    from recbole_weaverec.quick_start import run

    rows = []
    for point in grid:
        start = time.perf_counter()
        result = run(model, dataset, config_dict={**config, **point})
        rows.append({"params": point, "valid": {k: float(v) for k, v in result["best_valid_result"].items()},
                     "test": {k: float(v) for k, v in result["test_result"].items()},
                     "seconds": time.perf_counter() - start})
    return rows


def max_difference(a_rows, b_rows):
    diffs = [abs(a[split][m] - b[split][m]) for a, b in zip(a_rows, b_rows) for split in ("valid", "test")
             for m in a[split]]
    missing = any(set(a[s]) != set(b[s]) for a, b in zip(a_rows, b_rows) for s in ("valid", "test"))
    return float("inf") if missing or len(a_rows) != len(b_rows) else max(diffs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="EASE", choices=sorted(DEFAULT_PARAM))
    p.add_argument("--k", type=int, default=8, help="grid points")
    p.add_argument("--dataset", default="amazon-sports")
    p.add_argument("--data-path", default=str(REPO.parent / "shared" / "data"),
                   help="folder of the dataset folders (a sample shipped in the package is found without it)")
    p.add_argument("--param", default=None, help="the swept key (default: reg_weight; L3AE: reg_weight_e)")
    p.add_argument("--low", type=float, default=None)
    p.add_argument("--high", type=float, default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config value for every run, YAML-parsed (repeatable), e.g. eval_mode=uni29")
    args = p.parse_args()

    from recbole_weaverec.sweep import log_grid, sweep

    param, low, high = DEFAULT_PARAM[args.model]
    param = args.param or param
    low, high = args.low if args.low is not None else low, args.high if args.high is not None else high
    data_path = Path(args.data_path).resolve()
    if not (data_path / args.dataset).is_dir() and (SAMPLES / args.dataset).is_dir():
        data_path = SAMPLES  # a sample that ships in the package
    extra = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set {item!r} is not allowed: expected KEY=VALUE")
        key, value = item.split("=", 1)
        extra[key] = yaml.safe_load(value)
    config = {"data_path": str(data_path), "state": "WARNING", "show_progress": False, **extra}
    grid = [{param: v} for v in log_grid(low, high, args.k)]

    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lae_sweep_") as tmp:
        os.chdir(tmp)  # RecBole's log/, saved/ and log_tensorboard/ of every run
        try:
            swept, sweep_s, sweep_peak, reset = _timed(lambda: sweep(args.model, args.dataset, grid, config))
            alone, runs_s, runs_peak, _ = _timed(lambda: separate_runs(args.model, args.dataset, grid, config))
        finally:
            os.chdir(home)
    diff = max_difference(alone, swept)
    match = diff <= TOL
    summary = {"model": args.model, "dataset": args.dataset, "param": param, "k": args.k,
               "separate_runs_s": round(runs_s, 2), "sweep_s": round(sweep_s, 2),
               "ratio": round(runs_s / sweep_s, 2), "max_metric_difference": diff, "metrics_match": match,
               "peak_rss_gib": {"separate_runs": round(runs_peak, 2), "sweep": round(sweep_peak, 2)},
               "peak_per_phase": reset}
    print(json.dumps(summary, indent=1))
    report(args, summary, grid, alone, swept, data_path)
    if not match:
        raise SystemExit(f"the sweep's metrics differ from the separate runs' by up to {diff} (allowed {TOL})")


def report(args, s, grid, alone, swept, data_path):
    metric = next(iter(alone[0]["valid"]))  # RecBole's first metric@k of the config
    lines = [f"**(a) {s['k']} separate runs: {s['separate_runs_s']:.1f} s; (b) one sweep: {s['sweep_s']:.1f} s; "
             f"ratio (a)/(b) = {s['ratio']:.2f}x** (goal >= 3x for k = 8 on amazon-sports). Metrics "
             f"{'match' if s['metrics_match'] else 'DIFFER'} (largest difference over every metric of both splits: "
             f"{s['max_metric_difference']:.1e}, allowed {TOL:g}).", "",
             f"- {args.model} on {args.dataset} ({data_path}), {s['param']} at {s['k']} log-spaced values; the "
             f"package's defaults otherwise (tie_break, test_history, eval mode, seed)"
             + (f" plus {', '.join(args.set)}" if args.set else "") + ".",
             f"- Peak RSS: separate runs {s['peak_rss_gib']['separate_runs']:.2f} GiB, sweep "
             f"{s['peak_rss_gib']['sweep']:.2f} GiB"
             + (" (VmHWM, reset before each phase)." if s["peak_per_phase"] else
                " (VmHWM could not be reset: both are the process's peak so far)."),
             "- Row times: a separate run is the whole `run()`; a sweep row is its solve and both evaluations "
             "(the first also builds G and the model; loading the dataset counts in (b)'s total only).",
             "", f"| {s['param']} | valid {metric} | test {metric} | separate run s | sweep row s |",
             "|---|---|---|---|---|"]
    for point, a, b in zip(grid, alone, swept):
        lines.append(f"| {point[s['param']]:.4g} | {b['valid'][metric]:.4f} | {b['test'][metric]:.4f} | "
                     f"{a['seconds']:.1f} | {b['seconds']:.1f} |")
    write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
