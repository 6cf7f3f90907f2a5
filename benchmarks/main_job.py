"""The README's main job (issue 14.1 / 14.6): wall time and peak RSS of `python run_recbole_weaverec.py`, each run in a
fresh empty folder (nothing reused), optionally under extra environment variables.

    python benchmarks/main_job.py                                            # the default
    python benchmarks/main_job.py --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=0    # a variant, as its own row

Rows are kept in benchmarks/main_job_rows.json (one per variant, replaced when rerun); the RESULTS.md section is
rewritten from them. Run it on an otherwise idle machine: the wall time is the point.
"""
import argparse
import json
import os
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


def run(env_extra):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env_extra}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(REPO / "run_recbole_weaverec.py")], cwd=tmp, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"the main job failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    table = [line for line in done.stderr.splitlines() if line.startswith(("ndcg@5", "hit@5"))]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # GiB (the only child run so far)
    return {"wall_s": round(wall, 1), "peak_gib": round(peak, 2), "table": table,
            "load_before": round(os.getloadavg()[0], 2), "finished": time.strftime("%Y-%m-%d %H:%M")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for the job's environment (repeatable)")
    args = p.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    label = " ".join(args.env) or "default"
    rows = json.loads(ROWS.read_text()) if ROWS.exists() else {}
    rows[label] = {"env": env, **run(env)}
    ROWS.write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| variant | wall time | peak RSS | test NDCG@5 / Hit@5 row (WeaveRec, θ0, zero-shot, Pop) | load before |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        shown = "<br>".join(" ".join(t.split()) for t in r["table"])
        lines.append(f"| {name} | {r['wall_s'] / 60:.1f} min | {r['peak_gib']:.2f} GiB | {shown} | {r['load_before']} |")
    body = "\n".join(lines) + """

- The README's main command: WeaveRec on toys-sample (source beauty-sample), embedded SmolLM2-135M, 32 θ0 prompts,
  a 16+16 hybrid, 12 seeded uni29 test users; a fresh folder per run (no adapter reused). Goals (issue 14): ≤ 5 min
  and ≤ 2.5 GB. Peak RSS is the job's own (getrusage of the child).
"""
    write_section("Main job: wall time and memory (issue 14.1 / 14.6)", body,
                  command="python benchmarks/main_job.py [--env KEY=VALUE]")
    print(json.dumps(rows[label], indent=1))


if __name__ == "__main__":
    main()
