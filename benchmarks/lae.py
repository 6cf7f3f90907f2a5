"""Linear autoencoders on the four real Amazon domains: our EASE vs RecBole's, and EASE/RLAE/RDLAE/L3AE tuned.

    python benchmarks/lae.py [--data_path ../shared/data] [--domains amazon-pantry amazon-toys ...]

Protocol (everything through RecBole's leave-one-out split and evaluator, full ranking of the whole catalogue):
- tie_break none and test_history train for every model here, so our models see exactly what RecBole's EASE sees
  (RecBole's general models score the test split from the training rows only; equal scores keep RecBole's order).
- eval_batch_size is set to 256 users per batch (256 x n_items).
- Part 1: our EASE and RecBole's EASE (``recbole:EASE``) at RecBole's default reg_weight 250, each fitted in its own
  subprocess: fit time (model construction = the closed-form solve), the process's peak RSS (os.wait4), and test
  Recall@20 / NDCG@20.
- Part 2: a small greedy search per domain, selected by validation NDCG@20, then the chosen setting's test metrics:
  EASE reg_weight in {100, 250, 500} (250 is part 1's run); RLAE xi in {0.1, 0.3} at EASE's chosen reg_weight;
  RDLAE drop_p in {0.25, 0.5} at EASE's reg_weight and RLAE's xi; L3AE (reg_weight_x, reg_weight_f, reg_weight_e)
  in {(-100, 10, 200) (the authors' toys setting), (0, 10, 200), (-100, 10, 500)} with the default text (title,
  brand, categories) through the embedded all-MiniLM-L6-v2. The search runs in one subprocess per domain (the
  dataset is loaded once); "fit peak" is the rise of the peak RSS during that model's construction.
  Peak RSS of a whole process comes from os.wait4.
Results go to benchmarks/RESULTS.md ("Linear autoencoders (benchmarks/lae.py)"), rewritten after every domain.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SECTION = "Linear autoencoders (benchmarks/lae.py)"
DOMAINS = ["amazon-pantry", "amazon-toys", "amazon-beauty", "amazon-sports"]  # smallest catalogue first
SELECT = "ndcg@20"
SEARCH_KEYS = ("EASE", "RLAE", "RDLAE", "L3AE")
COMMON = {"state": "WARNING", "show_progress": False, "tie_break": "none", "test_history": "train"}

# Greedy search, one subprocess per domain: "@EASE" / "@RLAE" take the value chosen by that earlier search.
# EASE's reg_weight=250 setting is the separately measured "ours" run of part 1 (not fitted twice).
SEARCH = [
    ("EASE", [{"reg_weight": r} for r in (100.0, 500.0)]),
    ("RLAE", [{"reg_weight": "@EASE", "xi": xi} for xi in (0.1, 0.3)]),
    ("RDLAE", [{"reg_weight": "@EASE", "xi": "@RLAE", "drop_p": q} for q in (0.25, 0.5)]),
    ("L3AE", [{"reg_weight_x": x, "reg_weight_f": f, "reg_weight_e": e}
              for x, f, e in ((-100.0, 10.0, 200.0), (0.0, 10.0, 200.0), (-100.0, 10.0, 500.0))]),
]


# ---------------------------------------------------------------- child: runs inside its own process
def _status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))


def _reset_peak():
    """Reset VmHWM so the next reading is the peak of what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _fit_and_validate(model_name, params, base, train_data, valid_data):
    from recbole_weaverec.quick_start import build_config, get_trainer_class

    config = build_config(model_name, base["dataset"], config_dict={**base["config"], **params})
    gc.collect()
    rss0 = _status_mb("VmRSS")
    _reset_peak()
    t = time.perf_counter()
    model = config.model_class(config, train_data._dataset)
    fit_s = time.perf_counter() - t
    fit_peak = _status_mb("VmHWM") - rss0
    trainer = get_trainer_class(config, config.model_class)(config, model)
    valid = dict(trainer.evaluate(valid_data, load_best_model=False, show_progress=False))
    run = {"params": params, "fit_s": fit_s, "fit_peak_mb": fit_peak, "valid": {k: float(v) for k, v in valid.items()}}
    print(json.dumps({"model": model_name, **run}), file=sys.stderr, flush=True)
    return run, model, trainer


def _test(model, trainer, valid_data, test_data):
    if hasattr(model, "before_test"):
        model.before_test(valid_data)
    test = dict(trainer.evaluate(test_data, load_best_model=False, show_progress=False))
    return {k: float(v) for k, v in test.items()}


def child(job):
    sys.path.insert(0, str(REPO))
    from recbole_weaverec.quick_start import build_config, prepare

    # the dataloaders take their batch size when they are built: size it from the catalogue before loading
    with open(Path(job["data_path"]) / job["domain"] / f"{job['domain']}.item", encoding="utf-8") as f:
        n_items = sum(1 for _ in f)  # header line stands in for the padding item
    base = {"dataset": job["domain"],
            "config": {**COMMON, "data_path": job["data_path"], "eval_batch_size": 256 * n_items}}
    searches = job["searches"]
    config = build_config(searches[0][0], job["domain"], config_dict=base["config"])
    dataset, train_data, valid_data, test_data = prepare(config)
    out = {"n_users": dataset.user_num - 1, "n_items": dataset.item_num - 1}
    chosen = {}
    for model_name, grid in searches:
        res = out[model_name] = {"runs": list(job.get("prior", {}).get(model_name, []))}
        if model_name == "L3AE":  # encode (or read from the cache) once, timed apart from the fits
            from recbole_weaverec.model.lae.l3ae import item_text_embeddings

            t = time.perf_counter()
            item_text_embeddings(build_config("L3AE", job["domain"], config_dict=base["config"]),
                                 train_data._dataset)
            res["encode_s"] = time.perf_counter() - t
        best = max(res["runs"], key=lambda r: r["valid"][SELECT]) if res["runs"] else None
        keep = None
        for params in grid:
            params = {k: chosen[v[1:]][k] if isinstance(v, str) and v.startswith("@") else v
                      for k, v in params.items()}
            run, model, trainer = _fit_and_validate(model_name, params, base, train_data, valid_data)
            res["runs"].append(run)
            if best is None or run["valid"][SELECT] > best["valid"][SELECT]:
                best, keep = run, (model, trainer)
            del model, trainer
        if keep is not None:  # a prior run (with its own test result) may have won instead
            t = time.perf_counter()
            best["test"] = _test(*keep, valid_data, test_data)
            best["test_eval_s"] = time.perf_counter() - t
        del keep
        res["best"] = best
        chosen[model_name] = best["params"]
    print("RESULT " + json.dumps(out), flush=True)


# ---------------------------------------------------------------- parent
def run_child(job, log):
    """Run one job in a fresh Python; returns its result dict plus the process's peak RSS (MB)."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(job)], cwd=log.parent,
                            stdout=subprocess.PIPE, stderr=open(log, "a"), env=env, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode} (see {log})", "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": wall}
    result = json.loads(lines[-1][len("RESULT "):])
    result.update(peak_rss_mb=usage.ru_maxrss / 1024, wall_s=wall)
    return result


def fmt(x, nd=4):
    return "–" if x is None else f"{x:.{nd}f}"


def params_str(params):
    return ", ".join(f"{k}={v:g}" for k, v in params.items())


def render(results):
    lines = ["Full ranking, RecBole leave-one-out split (TO + LS valid_and_test), seed 2020, tie_break none, "
             "test_history train for every row (RecBole's protocol for general models). Times are wall-clock on a "
             "shared 2-core machine (other jobs were running), so ratios are indicative."
             + ("" if set(DOMAINS) <= set(results) else " Not run in this invocation: "
                + ", ".join(d for d in DOMAINS if d not in results) + "."), "",
             "### Our EASE vs RecBole's EASE (reg_weight 250, each fitted in its own process)", "",
             "| domain | users | items | ours fit s | RecBole fit s | time ratio | ours peak RSS GB (fit) | "
             "RecBole peak RSS GB (fit) | ours R@20 / N@20 | RecBole R@20 / N@20 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for domain, res in results.items():
        ours, theirs = res.get("ours"), res.get("recbole")
        if not ours or not theirs:
            continue
        if "error" in ours or "error" in theirs:
            lines.append(f"| {domain} | | | {ours.get('error', '')} | {theirs.get('error', '')} | | "
                         f"{ours['peak_rss_mb'] / 1024:.2f} | {theirs['peak_rss_mb'] / 1024:.2f} | | |")
            continue
        o, r = ours["best"], theirs["best"]
        lines.append(
            f"| {domain} | {ours['n_users']} | {ours['n_items']} | {o['fit_s']:.1f} | {r['fit_s']:.1f} | "
            f"{o['fit_s'] / r['fit_s']:.2f}x | {ours['peak_rss_mb'] / 1024:.2f} ({o['fit_peak_mb'] / 1024:.2f}) | "
            f"{theirs['peak_rss_mb'] / 1024:.2f} ({r['fit_peak_mb'] / 1024:.2f}) | "
            f"{fmt(o['test']['recall@20'])} / {fmt(o['test']['ndcg@20'])} | "
            f"{fmt(r['test']['recall@20'])} / {fmt(r['test']['ndcg@20'])} |")
    lines += ["", "### Tuned on validation NDCG@20, test metrics of the chosen setting", "",
              "| domain | model | chosen setting | valid N@20 | test R@20 | test N@20 | fit s | fit peak GB | "
              "settings tried |", "|---|---|---|---|---|---|---|---|---|"]
    for domain, res in results.items():
        for model in ("EASE", "RLAE", "RDLAE", "L3AE"):
            r = res.get(model)
            if not r:
                continue
            if "error" in r:
                lines.append(f"| {domain} | {model} | {r['error']} | | | | | | |")
                continue
            b = r["best"]
            lines.append(f"| {domain} | {model} | {params_str(b['params'])} | {fmt(b['valid']['ndcg@20'])} | "
                         f"{fmt(b['test']['recall@20'])} | {fmt(b['test']['ndcg@20'])} | {b['fit_s']:.1f} | "
                         f"{b['fit_peak_mb'] / 1024:.2f} | {len(r['runs'])} |")
    enc = [f"{d}: {res['L3AE']['encode_s']:.0f} s" + (" (read from the on-disk cache, encoded by an earlier run)"
                                                       if res["L3AE"]["encode_s"] < 10 else "")
           for d, res in results.items() if res.get("L3AE") and "encode_s" in res["L3AE"]]
    if enc:
        lines += ["", "L3AE item-text encoding with the embedded all-MiniLM-L6-v2 (once per domain, then read from "
                  "the on-disk cache; not part of the fit times): " + ", ".join(enc) + "."]
    lines += ["", "Every validation score of the search (valid N@20):", ""]
    for domain, res in results.items():
        for model in ("EASE", "RLAE", "RDLAE", "L3AE"):
            r = res.get(model)
            if r and "runs" in r:
                tried = "; ".join(f"{params_str(x['params'])}: {fmt(x['valid']['ndcg@20'])}" for x in r["runs"])
                lines.append(f"- {domain} {model}: {tried}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--domains", nargs="+", default=DOMAINS)
    p.add_argument("--log_dir", default="/tmp/lae-bench-logs",
                   help="child logs and results.json (finished steps are reused when the script is rerun)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))

    sys.path.insert(0, str(REPO))
    from benchmarks.results import write_section

    data_path = os.path.abspath(args.data_path)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    store = log_dir / "results.json"
    done = json.loads(store.read_text()) if store.is_file() else {}
    command = ("python benchmarks/lae.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    results = {}
    for domain in args.domains:
        res = results.setdefault(domain, {})
        log = log_dir / f"lae-{domain}.log"

        def step(key, job):
            job = {"domain": domain, "data_path": data_path, **job}
            cache_key = json.dumps([key, job], sort_keys=True)
            if cache_key in done and "error" not in done[cache_key]:
                res[key] = done[cache_key]
                return res[key]
            print(f"[{time.strftime('%H:%M:%S')}] {domain} {key}", flush=True)
            res[key] = run_child(job, log)
            done[cache_key] = res[key]
            store.write_text(json.dumps(done))
            print(json.dumps({k: v for k, v in res[key].items() if k not in SEARCH_KEYS}), flush=True)
            return res[key]

        for key, model in (("ours", "EASE"), ("recbole", "recbole:EASE")):
            out = step(key, {"searches": [(model, [{"reg_weight": 250.0}])]})
            res[key] = {**out, **out.get(model, {})}
        prior = {"EASE": [res["ours"]["best"]]} if "best" in res["ours"] else {}
        search = step("search", {"searches": SEARCH, "prior": prior})
        for model in SEARCH_KEYS:
            if model in search:
                res[model] = {**search[model], "n_users": search["n_users"]}
            elif "error" in search:
                res[model] = {"error": search["error"]}
        write_section(SECTION, render(results), command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
