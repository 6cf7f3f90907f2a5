"""Running one cell: in this process (``run_cell``, the child's entry point ``_cell_main``) or in a fresh Python
process of its own with a timeout (``SubprocessRunner``)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from recbole_weaverec.files import write_text


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


def _tie_break(config):
    # RecBole's models have no such key: equal scores keep torch.topk's item order
    return config["tie_break"] if "tie_break" in config else "none"


PER_USER_DECIMALS = 6  # stored rounded: a cell of 20k users and 8 metrics stays near 1 MB of JSON


def _with_per_user(metrics, per_user, decimal_place):
    """(metrics, per_user row entry): the top-k metrics become the exact means of the per-user values (RecBole
    rounds its own to ``metric_decimal_place``), users sorted by token. The two must agree to that rounding: a
    trainer whose evaluate scores differently from RecBole's loop keeps its metrics and stores no per-user data."""
    import numpy as np

    order = np.argsort(np.asarray(per_user["users"]), kind="stable")
    tol = 0.5 * 10.0 ** -decimal_place + 1e-9
    means, values = {}, {}
    for key, v in per_user["metrics"].items():
        v = np.asarray(v, dtype=np.float64)[order]
        if key in metrics and abs(float(v.mean()) - metrics[key]) > tol:
            print(f"warning: per-user {key} averages {v.mean():.6f}, the trainer reported {metrics[key]}: "
                  f"no per-user data stored for this cell", file=sys.stderr)
            return metrics, None
        means[key] = float(v.mean())
        values[key] = np.round(v, PER_USER_DECIMALS).tolist()
    users = [per_user["users"][i] for i in order]
    return {**metrics, **means}, {"users": users, "metrics": values}


def run_cell(cell, show_progress=False):
    """Run one cell in this process; returns the result row (never raises for a model's failure)."""
    from recbole_weaverec import quick_start

    config_dict = dict(cell["config"])
    sample_seed = config_dict.pop("sample_seed")
    config_dict.setdefault("show_progress", show_progress)
    row = {"status": "failed", "error": "", "metrics": {}, "history": "", "tie_break": "", "model_type": ""}
    start = time.time()
    try:
        config = quick_start.build_config(cell["model"], cell["dataset"], config_dict=config_dict)
        row["history"] = _history(config)
        row["tie_break"] = _tie_break(config)
        row["model_type"] = config["MODEL_TYPE"].name
        shared, table = _candidates_seeded_by(quick_start, sample_seed)
        quick_start.SharedCandidateSampler = table
        try:
            result = quick_start.run(cell["model"], cell["dataset"], config_dict=config_dict, saved=True,
                                     per_user=True)
        finally:
            quick_start.SharedCandidateSampler = shared
        metrics = {k: float(v) for k, v in result["test_result"].items() if isinstance(v, (int, float))}
        row["metrics"], row["per_user"] = _with_per_user(metrics, result["test_per_user"],
                                                         config["metric_decimal_place"])
        row["valid_score"] = float(result["best_valid_score"])
        row["status"] = "ok"
    except Exception as e:  # one line: the type and the first line of the message
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".strip()
    row["wall_s"] = round(time.time() - start, 2)
    from recbole_weaverec.leaderboard.fingerprint import loaded_code

    row["code"] = loaded_code()  # the package files this run imported: the cache recomputes it when one changes
    return row


def _cell_main(cell_file, result_file, show_progress):
    """Entry point of the child process."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _stop_when_orphaned()
    cell = json.loads(Path(cell_file).read_text(encoding="utf-8"))
    row = run_cell(cell, show_progress)
    write_text(result_file, json.dumps(row))
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
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
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
