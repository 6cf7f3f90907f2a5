"""Where a closed-form sweep's time goes (issue 18.3): the cost floor of one grid point against one separate run.

A sweep (``recbole_weaverec.sweep``) shares the dataset and G = XᵀX across its points; every point still needs B for
its own λ, i.e. one inverse of an n x n SPD matrix, and two evaluations. This script measures, on one domain's real
G (fp32, the package's ``lae_dtype`` default, 2 cores):

- one separate EASE run (``quick_start.run``: load, G, solve, both evaluations) -> T_run, after an untimed warm-up
  run (file cache, imports);
- one sweep of 2 points; its second row is a refit (solve + both evaluations) -> T_point;
- the package's solve (``solve_spd_inverse``: Cholesky factor + Cholesky inverse) on that G -> T_solve, and
  T_eval = T_point - T_solve;
- what the other exact route would cost: one n x n product (per point: P = V diag(1/(Λ+λ)) Vᵀ after one
  eigendecomposition G = VΛVᵀ), and, with ``--eigh``, the eigendecomposition itself.

The best a sweep of k points can reach is k·T_run / (T_setup + k·T_point) < T_run / T_point; the script prints that
bound for k = 8 next to the goal (3x). ``--write`` rewrites the section "Closed-form sweep: cost of one point
(benchmarks/solve_floor.py)" of RESULTS.md.

    python benchmarks/solve_floor.py [--dataset amazon-sports] [--data-path ../shared/data] [--eigh] [--write]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.results import write_section  # noqa: E402

SECTION = "Closed-form sweep: cost of one point (benchmarks/solve_floor.py)"
K = 8
REG = (250.0, 500.0)  # the two sweep points (EASE's default λ, then its double)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="amazon-sports")
    p.add_argument("--data-path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--eigh", action="store_true", help="also time the eigendecomposition of G (minutes at 18k items)")
    p.add_argument("--write", action="store_true", help="rewrite the RESULTS.md section (else print only)")
    args = p.parse_args()
    data_path = Path(args.data_path).resolve()
    if not (data_path / args.dataset).is_dir():
        raise SystemExit(f"--dataset {args.dataset!r} is not allowed: no folder {data_path / args.dataset}")

    import numpy as np
    import torch

    from recbole_weaverec.model.lae.base import solve_spd_inverse
    from recbole_weaverec.quick_start import run
    from recbole_weaverec.sweep import sweep

    config = {"data_path": str(data_path), "state": "WARNING", "show_progress": False}
    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="solve_floor_") as tmp:
        os.chdir(tmp)  # RecBole's log/ and saved/
        try:
            load_start = os.getloadavg()
            # a first run warms the file cache and imports, charged to neither side
            run("EASE", args.dataset, config_dict={**config, "reg_weight": REG[0]})
            rows, sweep_s = _timed(lambda: sweep("EASE", args.dataset, [{"reg_weight": v} for v in REG], config))
            _, run_s = _timed(lambda: run("EASE", args.dataset, config_dict={**config, "reg_weight": REG[1]}))
            # the G the sweep solved, built as LinearAutoencoder.gram does, from the same training split
            from recbole_weaverec.quick_start import build_config, prepare

            _, train_data, _, _ = prepare(build_config("EASE", args.dataset, None, config))
            X = train_data._dataset.inter_matrix(form="csr").astype(np.float32)
            A = torch.from_numpy((X.T @ X).toarray())  # G, regularised in place below
            del X, train_data
        finally:
            os.chdir(home)
    n = A.shape[0]
    A.diagonal().add_(REG[1])
    (L, _), potrf_s = _timed(lambda: torch.linalg.cholesky_ex(A))  # one factorisation, timed and reused
    _, potri_s = _timed(lambda: torch.cholesky_inverse(L))
    del L
    _, solve_s = _timed(lambda: solve_spd_inverse(A.clone()))
    _, gemm_s = _timed(lambda: A @ A)
    eigh_s = _timed(lambda: torch.linalg.eigh(A))[1] if args.eigh else None

    point_s = rows[1]["seconds"]
    eval_s = point_s - solve_s
    setup_s = sweep_s - point_s * len(REG)  # loading, G and the model, beyond the points themselves
    best_k = K * run_s / (setup_s + K * point_s)
    no_solve_k = K * run_s / (setup_s + K * eval_s)
    eig_k = (K * run_s / (setup_s + eigh_s + K * (gemm_s + eval_s))) if eigh_s is not None else None
    load = os.getloadavg()
    lines = [
        f"EASE on {args.dataset}: n = {n:,} items (fp32). One separate run T_run = **{run_s:.1f} s**; one sweep point "
        f"(refit: solve + both evaluations) T_point = **{point_s:.1f} s**, of which the package's solve "
        f"{solve_s:.1f} s (Cholesky factor {potrf_s:.1f} s + Cholesky inverse {potri_s:.1f} s) and the two "
        f"evaluations {eval_s:.1f} s; the sweep's setup (dataset, G, model) {setup_s:.1f} s.", "",
        f"- A sweep of k = {K} (setup + {K} points) against {K} separate runs: **{best_k:.2f}x** (goal >= 3x). "
        f"Even a free solve would give {no_solve_k:.2f}x: the evaluations alone cost "
        f"{eval_s / run_s:.0%} of a run.",
        f"- The eigendecomposition route (G = VΛVᵀ once, then P = V diag(1/(Λ+λ)) Vᵀ per point) costs one n x n "
        f"product per point: {gemm_s:.1f} s, vs the solve's {solve_s:.1f} s"
        + (f"; with the decomposition itself ({eigh_s:.1f} s) a k = {K} sweep would reach {eig_k:.2f}x."
           if eigh_s is not None else " (decomposition not timed: `--eigh`)."),
        f"- Load average (1, 5, 15 min) at the start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
        f"at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; a warm-up run (not timed) came first.",
    ]
    print("\n".join(lines))
    if args.write:
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
