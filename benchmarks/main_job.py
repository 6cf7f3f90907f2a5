"""The README's main job (issue 14.1 / 14.6): wall time and peak RSS of `python run_recbole_weaverec.py`, each run in a
fresh empty folder (nothing reused), optionally under extra environment variables.

    python benchmarks/main_job.py                                            # the default
    python benchmarks/main_job.py --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=0    # a variant, as its own row
    python benchmarks/main_job.py --job-args=--model=LLMRec                  # another command line (issue 14.1)

Rows are kept in benchmarks/main_job_rows.json (one per variant, replaced when rerun); the RESULTS.md section is
rewritten from them. Run it on an otherwise idle machine: the wall time is the point.
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.results import write_section  # noqa: E402

ROWS = Path(__file__).with_name("main_job_rows.json")


def run(env_extra, job_args=()):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env_extra}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "run_recbole_weaverec.py"), *job_args], cwd=tmp, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the main job failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    table = [line for line in done.stderr.splitlines() if line.startswith(("ndcg@5", "hit@5"))]
    test = next((line.split("test result", 1)[1] for line in done.stderr.splitlines()[::-1]
                 if "test result" in line), "")
    test = ", ".join(f"{k} {float(v):.4f}" for k, v in re.findall(r"'(ndcg@5|hit@5)', (?:np\.float64\()?([0-9.]+)", test))
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (the only child run so far)
    return {"wall_s": round(wall, 1), "peak_gib": round(peak, 2), "table": table, "test": test,
            "load_before": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment (repeatable)")
    p.add_argument("--job-args", default="", help="arguments of run_recbole_weaverec.py, e.g. --model=LLMRec")
    p.add_argument("--label", default=None, help="the row's name (default: the job arguments and --env values)")
    p.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from the rows")
    args = p.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    job_args = args.job_args.split()
    label = args.label or " ".join(job_args + args.env) or "default"
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    if not args.report_only:
        rows[label] = {"env": env, "job_args": job_args, **run(env, job_args)}
        ROWS.write_text(json.dumps(rows, indent=1) + "\n")
    report(rows)
    if not args.report_only:
        print(json.dumps(rows[label], indent=1))


def report(rows):
    lines = ["| variant | wall time | peak RSS | test NDCG@5 / Hit@5 (main job: WeaveRec, θ0, zero-shot, Pop) | load before |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        shown = "<br>".join(" ".join(t.split()) for t in r["table"]) or r.get("test", "")
        lines.append(f"| {name} | {r['wall_s'] / 60:.1f} min | {r['peak_gib']:.2f} GiB ({r['peak_gib'] * 2**30 / 1e9:.2f} GB) "
                     f"| {shown} | {r['load_before']} |")
    body = "\n".join(lines) + """

- The README's main command: WeaveRec on toys-sample (source beauty-sample), embedded SmolLM2-135M, 32 θ0 prompts,
  a 16+16 hybrid, 12 seeded uni29 test users; a fresh folder per run (no adapter reused). Goals (issue 14): ≤ 5 min
  and ≤ 2.5 GB. Peak RSS is the job's own (getrusage of the child). Rows named "before:" ran the package at
  646d71a, before it capped oneDNN's primitive cache at 64 and released the heap between LoRA modules
  (`compat.py`); each `--env` row sets that one variable on top of it.
"""
    write_section("Main job: wall time and memory (issue 14.1 / 14.6)", body,
                  command="python benchmarks/main_job.py [--env KEY=VALUE] [--job-args=ARGS] [--label NAME]")


if __name__ == "__main__":
    main()
