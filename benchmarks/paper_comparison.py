"""Issues 14.5 / 21.4: WeaveRec beside its baselines on one target, with per-user paired 95% intervals.

For a target and its sources (any platforms: Amazon, ml-100k, ...), the single-source case (the first source) and,
with more than one source, the multi-source case (all of them): Pop and EASE, one WeaveRec (average merge) run per
case whose own comparison evaluations give LLMRec (θ0) and the zero-shot model on the same users and candidates
(no extra training), LLMMerge (average) and LLMJoint. Every LLM run of a setting shares one adapter folder, so θ0
and each per-domain module train once. Each finished row goes to ``<workdir>/rows.jsonl`` with its per-user metrics
(a rerun skips it: a killed run resumes), and the RESULTS.md section is rewritten after every row.

    nohup nice -n 5 python benchmarks/paper_comparison.py --target amazon-toys --sources ml-100k \\
        --domain-setting ml-100k:title_field=movie_title > /work/logs/paper_comparison-amazon-toys.log 2>&1 &
"""
import argparse
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks.llm_learning import Rows  # noqa: E402  (one finished row per line, appended whole)
from benchmarks.results import write_section  # noqa: E402

VARIANTS = {
    "short": {"prompt_candidates": False, "max_history": 5, "max_title_tokens": 10},
    "listed": {"prompt_candidates": True, "max_history": 5, "max_title_tokens": 10},
}
BASELINES = ("Pop", "EASE")
LLM_ROWS = ("WeaveRec (average)", "LLMRec (θ0)", "zero-shot", "LLMMerge (average)", "LLMJoint")
FROM_WEAVEREC = {"LLMRec (θ0)": "target_only_test_result", "zero-shot": "zero_shot_test_result"}
METRICS = ("ndcg@5", "hit@5", "mrr@5")
LEARNED = {"weave_merge": "learned", "weave_learn_steps": 64, "weave_learn_users": 32,  # --learned
           "weave_compare_target_only": False}  # θ0 / zero-shot are already rows: one test pass only


def llm_rows(args):
    return LLM_ROWS + (("WeaveRec (learned)",) if args.learned else ())


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--sources", required=True, help="S1[,S2,...]: single-source case = S1, multi-source = all")
    p.add_argument("--data-path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--users", type=int, default=500, help="eval_sample_users (seeded, uni29)")
    p.add_argument("--samples", type=int, default=512, help="training prompts per module (θ0, each side of a "
                                                            "hybrid, each LLMMerge/LLMJoint domain)")
    p.add_argument("--variant", default="short", choices=sorted(VARIANTS))
    p.add_argument("--llm-score", default="mean", choices=["mean", "sum"],
                   help="llm_score of every LLM row: mean = length-normalised log-likelihood, sum = log-probability")
    p.add_argument("--rescore", action="store_true",
                   help="also score θ0 (the trained target adapter, reused: no training) by the other llm_score rule, "
                        "as the row 'LLMRec (θ0), llm_score OTHER', compared with θ0 on the same users")
    p.add_argument("--learned", action="store_true",
                   help="also WeaveRec with weave_merge: learned (its modules reused from the average run's folder)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--domain-setting", action="append", default=[], metavar="NAME:KEY=VALUE",
                   help="a domain_settings entry for every run (repeatable; VALUE none = None), e.g. "
                        "ml-100k:title_field=movie_title")
    p.add_argument("--title-fallback-field", default="categories",
                   help="title_fallback_field of the Amazon domains (amazon-sports has items titled 'null'); none: off")
    p.add_argument("--workdir", default=None, help="default: /work/logs/paper_comparison-<target>")
    p.add_argument("--llm-path", default="embedded")
    p.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from rows.jsonl")
    args = p.parse_args(argv)
    args.sources = [s for s in args.sources.split(",") if s]
    args.workdir = str(Path(args.workdir or f"/work/logs/paper_comparison-{args.target}").resolve())
    args.data_path = str(Path(args.data_path).resolve())
    if args.llm_path != "embedded" and Path(args.llm_path).exists():  # a local folder; the run chdirs to workdir
        args.llm_path = str(Path(args.llm_path).resolve())
    return args


def domain_settings(args):
    """--domain-setting entries, plus the Amazon domains' title fallback (an explicit entry wins)."""
    import yaml

    out = {}
    for d in [args.target, *args.sources]:
        if d.startswith("amazon-") and args.title_fallback_field != "none":
            out.setdefault(d, {})["title_fallback_field"] = args.title_fallback_field
    for entry in args.domain_setting:
        name, sep, rest = entry.partition(":")
        key, eq, value = rest.partition("=")
        if not (sep and eq and name and key):
            sys.exit(f"--domain-setting {entry!r}: expected NAME:KEY=VALUE, e.g. ml-100k:title_field=movie_title")
        out.setdefault(name, {})[key] = None if value.lower() == "none" else yaml.safe_load(value)
    return out


def cases(args):
    """[(case name, sources)]: single = the first source; multi = all of them, only when there are several."""
    out = [("single", args.sources[:1])]
    return out + [("multi", list(args.sources))] if len(args.sources) > 1 else out


def tag(args):
    """What an LLM row depends on beyond its model and sources: a row of other settings is never reused."""
    backbone = "embedded" if args.llm_path == "embedded" else Path(args.llm_path).name
    score = "" if args.llm_score == "mean" else f"-{args.llm_score}"  # mean rows keep their keys
    return f"{args.variant}-n{args.samples}-lr{args.lr:g}-b{args.batch}-u{args.users}-{backbone}{score}"


def row_key(model, args, sources=None):
    if sources is None:  # Pop, EASE: one row for both cases
        return f"{model}|u{args.users}"
    return f"{model}|{'+'.join(sources)}|{tag(args)}"


def common(args):
    return {"data_path": args.data_path, "seed": 2020, "eval_mode": "uni29", "metrics": ["NDCG", "MRR", "Hit"],
            "topk": [1, 3, 5], "valid_metric": "NDCG@5", "eval_sample_users": args.users, "show_progress": False,
            "checkpoint_dir": str(Path(args.workdir) / "saved"), "domain_settings": domain_settings(args)}


def llm_config(args, sources):
    n = args.samples
    return {**common(args), **VARIANTS[args.variant], "source_domains": list(sources), "llm_path": args.llm_path,
            "max_train_samples": n, "weave_target_samples": n, "weave_source_samples": n,
            "learning_rate": args.lr, "train_batch_size": args.batch, "epochs": 1, "train_bf16": True,
            "llm_score": args.llm_score,
            "eval_step": 0,  # one epoch leaves nothing for validation to choose: no validation pass (~1/4 of scoring)
            # one folder per setting: θ0 and each per-domain module are trained once and reused by every run
            "adapter_dir": str(Path(args.workdir) / "adapters" / tag(args))}


def as_row(key, model, case, per_user, seconds, config, note=None):
    return {"key": key, "target": config["target"], "model": model, "case": case, "users": list(per_user["users"]),
            "metrics": {k: np.asarray(v).tolist() for k, v in per_user["metrics"].items()}, "seconds": seconds,
            "note": note, "config": {k: v for k, v in config.items() if k not in ("data_path", "checkpoint_dir")},
            "finished": time.strftime("%Y-%m-%d %H:%M")}


def timed_run(model, args, config):
    from recbole_weaverec.quick_start import run

    start = time.perf_counter()
    out = run(model, args.target, config_dict=config, per_user=True) if model != "WeaveRec" else \
        run_with_comparisons(model, args.target, config)
    return out, time.perf_counter() - start


def run_with_comparisons(model, target, config_dict):
    """``quick_start.run(per_user=True)``'s ``test_result`` and ``test_per_user`` plus ``extra_per_user``: {result
    key: per-user values} of the trainer's comparison evaluations (WeaveTrainer's θ0 / zero-shot / Pop), recorded
    here with the same ``stats.recording_per_user`` (WeaveTrainer keeps the record each comparison made when
    ``per_user_records`` is set), so the package's run() stays as every cached leaderboard cell hashed it."""
    from recbole.utils import init_logger, init_seed

    from recbole_weaverec.quick_start import build_config, get_trainer_class, prepare
    from recbole_weaverec.stats import recording_per_user

    config = build_config(model, target, config_dict=config_dict)
    init_logger(config)
    _, train, valid, test = prepare(config)
    init_seed(config["seed"], config["reproducibility"])
    net = config.model_class(config, train._dataset).to(config["device"])
    trainer = get_trainer_class(config, config.model_class)(config, net)
    trainer.fit(train, valid, saved=True, show_progress=False)
    with recording_per_user(trainer) as evaluations:
        trainer.per_user_records = evaluations
        result = trainer.evaluate(test, load_best_model=True, show_progress=False)

    def tokens(ids, values):  # tokens, not internal ids, as quick_start.run gives them
        return {"users": [str(t) for t in test._dataset.id2token(config["USER_ID_FIELD"], ids)], "metrics": values}

    extra = {key: tokens(*rec) for key, rec in (getattr(trainer, "extra_per_user", None) or {}).items()
             if rec[0] is not None}
    return {"test_result": result, "test_per_user": tokens(*evaluations[0]), "extra_per_user": extra,
            **(getattr(net, "extra_results", None) or {})}  # e.g. target_only_test_result, as run() returns them


def run_baseline(args, rows, name):
    key = row_key(name, args)
    if rows.get(key):
        return False
    config = common(args)
    out, seconds = timed_run(name, args, config)
    summary = {"model": name, "target": args.target, **config}
    rows.add(as_row(key, name, "both", out["test_per_user"], seconds, summary))
    return True


def run_case(args, rows, case, sources, after_row):
    """The case's LLM rows; θ0 and zero-shot come from WeaveRec's own comparison evaluations."""
    weave = {"WeaveRec (average)": None, **FROM_WEAVEREC}
    if not all(rows.get(row_key(m, args, sources)) for m in weave):
        config = {**llm_config(args, sources), "weave_merge": "average", "weave_compare_target_only": True,
                  "weave_compare_baselines": True}
        out, seconds = timed_run("WeaveRec", args, config)
        missing = [k for k in FROM_WEAVEREC.values() if k not in out.get("extra_per_user", {})]
        if missing:
            raise RuntimeError(f"WeaveRec's run gave no per-user values for {missing}")
        summary = {"model": "WeaveRec", "target": args.target, **config}
        for model, extra in weave.items():
            if rows.get(row_key(model, args, sources)):  # a row kept from a run killed between its lines
                continue
            per_user = out["test_per_user"] if extra is None else out["extra_per_user"][extra]
            note = None if extra is None else "evaluated inside WeaveRec's run (no training of its own there)"
            rows.add(as_row(row_key(model, args, sources), model, case, per_user,
                            seconds if extra is None else None, summary, note))
        after_row()
    learned = [("WeaveRec (learned)", "WeaveRec", LEARNED)] if args.learned else []
    for model, name, extra in learned + [("LLMMerge (average)", "LLMMerge", {"merge_method": "average"}),
                                         ("LLMJoint", "LLMJoint", {})]:
        key = row_key(model, args, sources)
        if rows.get(key):
            continue
        config = {**llm_config(args, sources), **extra}
        out, seconds = timed_run(name, args, config)
        summary = {"model": name, "target": args.target, **config}
        rows.add(as_row(key, model, case, out["test_per_user"], seconds, summary))
        after_row()


def other_score(args):
    return "mean" if args.llm_score == "sum" else "sum"


def rescore_label(args):
    return f"LLMRec (θ0), llm_score {other_score(args)}"


def run_rescore(args, rows, after_row):
    """θ0 (the target's own adapter, trained by the case's WeaveRec run into the setting's adapter folder) scored
    by the other rule: LLMRec given that adapter (``adapter_paths``) and the other llm_score, so nothing trains."""
    key = row_key(rescore_label(args), args, [])
    if rows.get(key):
        return
    folder = Path(llm_config(args, [])["adapter_dir"]) / args.target
    if not (folder / "adapter_config.json").exists():
        sys.exit(f"{folder}: no θ0 adapter to rescore (the case's WeaveRec run trains it; run without --rescore)")
    config = {**llm_config(args, []), "llm_score": other_score(args), "adapter_paths": {args.target: str(folder)}}
    config.pop("source_domains")
    out, seconds = timed_run("LLMRec", args, config)  # LLMRec with adapter_paths evaluates it and trains nothing
    rows.add(as_row(key, rescore_label(args), "rescore", out["test_per_user"], seconds,
                    {"model": "LLMRec", "target": args.target, **config},
                    "θ0 reused from the adapter folder, scored by the other rule"))
    after_row()


# --- report (pure: rows in, text out) ----------------------------------------------------------------------------
def aligned(row, ref):
    """``row``'s per-user metrics in the user order of ``ref``; refused unless both hold exactly the same users."""
    index = {u: i for i, u in enumerate(row["users"])}
    if len(index) != len(row["users"]) or set(index) != set(ref["users"]) or len(ref["users"]) != len(index):
        only_row, only_ref = sorted(set(index) - set(ref["users"])), sorted(set(ref["users"]) - set(index))
        raise ValueError(f"{row['key']} and {ref['key']} were not evaluated on the same users ({len(index)} vs "
                         f"{len(ref['users'])}; only in the first: {only_row[:5]}, only in the second: "
                         f"{only_ref[:5]}): were they run with the same --users, data and seed?")
    order = [index[u] for u in ref["users"]]
    return {k: np.asarray(v, dtype=np.float64)[order] for k, v in row["metrics"].items()}


def delta(row, ref, metric="ndcg@5"):
    """Paired bootstrap of row − ref over the users both were evaluated on (aligned by user token)."""
    from recbole_weaverec.stats import paired_difference

    return paired_difference(aligned(row, ref)[metric], aligned(ref, ref)[metric])


def fmt(d):
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def case_table(found, refs):
    """Markdown table of ``found`` ({label: row or None}) with Δ NDCG@5 vs each of ``refs`` ({label: row})."""
    head = ["model", "NDCG@5", "Hit@5", "MRR@5", *(f"Δ NDCG@5 vs {k} [95% CI]" for k in refs), "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in found.items():
        if row is None:
            lines.append(f"| {label} | " + " | ".join(["pending"] * (len(head) - 1)) + " |")
            continue
        means = [f"{np.mean(row['metrics'][m]):.4f}" for m in METRICS]
        ds = ["—" if ref is None or ref is row else fmt(delta(row, ref)) for ref in refs.values()]
        wall = f"{row['seconds']:.0f}" if row.get("seconds") is not None else "(in WeaveRec's run)"
        lines.append(f"| {label} | " + " | ".join(means + ds + [wall]) + " |")
    return "\n".join(lines)


def claim(found):
    """The paper's "WeaveRec ≥ target-only > joint, merge", each part read from its paired NDCG@5 interval."""
    from recbole_weaverec.stats import verdict

    parts, holds, pending = [], True, False
    for a, b, need in (("WeaveRec (average)", "LLMRec (θ0)", "≥"), ("LLMRec (θ0)", "LLMJoint", ">"),
                       ("LLMRec (θ0)", "LLMMerge (average)", ">")):
        if found.get(a) is None or found.get(b) is None:
            parts.append(f"{a} {need} {b}: pending")
            pending = True
            continue
        d = delta(found[a], found[b])
        v = verdict(d)
        ok = v == "better" or (need == "≥" and v == "no difference")  # ≥ allows no difference, > does not
        holds = holds and ok
        parts.append(f"{a} vs {b} {fmt(d)}: {v}, so `{need}` {'holds' if ok else 'does not hold'}")
    overall = "not supported" if not holds else ("pending" if pending else "supported")
    return "; ".join(parts) + f" → claim {overall}"


def check_users(rows):
    """Every row on the same users as the first (a clear error otherwise; aligned() names both rows)."""
    for row in rows[1:]:
        aligned(row, rows[0])


def report_body(rows, target, case_list, keys, setup):
    """``keys``: {case: {label: row key}} (Pop/EASE included); ``setup``: bullet text of the settings."""
    by_key = {r["key"]: r for r in rows}
    check_users([by_key[k] for c in keys.values() for k in c.values() if k in by_key])
    out = []
    for case, sources in case_list:
        found = {label: by_key.get(k) for label, k in keys[case].items()}
        refs = {k: found.get(k) for k in ("LLMRec (θ0)", "zero-shot")}
        out.append(f"### {case}-source: {target} ← {', '.join(sources)}\n\n{case_table(found, refs)}\n")
    lines = [f"- {setup}", "- Δ: paired bootstrap over users of the row minus the reference (scipy, 10,000 "
             "resamples, percentile; `stats.paired_difference`), users aligned by token. An interval containing 0 "
             "is no difference."]
    for case, sources in case_list:
        found = {label: by_key.get(k) for label, k in keys[case].items()}
        lines.append(f"- Paper's claim \"WeaveRec ≥ target-only > joint, merge\", {case}-source "
                     f"({target} ← {', '.join(sources)}): {claim(found)}.")
    return "\n".join(out) + "\n" + "\n".join(lines) + "\n"


def rescore_line(by_key, keys):
    """The scoring-rule comparison on the same θ0, when a ``--rescore`` row exists."""
    (label, key), = keys["rescore"].items()
    row, ref = by_key.get(key), by_key.get(keys["single"]["LLMRec (θ0)"])
    if row is None or ref is None:
        return ""
    return (f"- Scoring rule on the same θ0: {label} {np.mean(row['metrics']['ndcg@5']):.4f} NDCG@5 vs "
            f"{np.mean(ref['metrics']['ndcg@5']):.4f}, Δ {fmt(delta(row, ref))} ({row['seconds']:.0f} s, "
            f"scoring only).\n")


def report(args, rows):
    case_list = cases(args)
    keys = {case: {**{b: row_key(b, args) for b in BASELINES}, **{m: row_key(m, args, s) for m in llm_rows(args)}}
            for case, s in case_list}
    backbone = "SmolLM2-135M-Instruct (embedded)" if args.llm_path == "embedded" else f"`{args.llm_path}`"
    settings = domain_settings(args)
    setup = (f"Setup: target `{args.target}`, test split, uni29 (true next item + 29 sampled, identical for every "
             f"row), {args.users} seeded test users (seed 2020); LLM rows: backbone {backbone}, variant "
             f"`{args.variant}` ({VARIANTS[args.variant]}), scored by `llm_score: {args.llm_score}`, "
             f"N = {args.samples} training prompts per module, lr "
             f"{args.lr:g}, batch {args.batch}, 1 epoch (no validation pass), bf16 training; domain settings "
             f"{settings or 'none'}. "
             + (f"WeaveRec (learned): λ per adapted module learned by {LEARNED['weave_learn_steps']} Adam steps "
                f"on {LEARNED['weave_learn_users']} validation users' prompts (no labels), the same modules as "
                f"the average. " if args.learned else "")
             + f"θ0 and zero-shot are WeaveRec's own comparison evaluations; modules are trained once per setting "
             f"and reused (a run's wall seconds exclude modules an earlier run trained). Rows: "
             f"`{Path(args.workdir) / 'rows.jsonl'}` (copied to `benchmarks/{repo_rows(args).name}`; resumable).")
    body = report_body(rows.rows, args.target, case_list, keys, setup)
    by_key = {r["key"]: r for r in rows.rows}
    body += rescore_line(by_key, {**keys, "rescore": {rescore_label(args): row_key(rescore_label(args), args, [])}})
    command = (f"python benchmarks/paper_comparison.py --target {args.target} --sources {','.join(args.sources)} "
               f"--users {args.users} --samples {args.samples} --variant {args.variant} --lr {args.lr:g} "
               f"--batch {args.batch}" + (f" --llm-score {args.llm_score}" if args.llm_score != "mean" else "")
               + "".join(f" --domain-setting {d}" for d in args.domain_setting)
               + (f" --title-fallback-field {args.title_fallback_field}"
                  if args.title_fallback_field != "categories" else "")
               + (f" --llm-path {args.llm_path}" if args.llm_path != "embedded" else "")
               + (" --learned" if args.learned else ""))
    write_section(f"Paper comparison: {args.target} ← {', '.join(args.sources)}", body, command=command)
    if rows.path.exists() and rows.path.resolve() != repo_rows(args).resolve():
        shutil.copyfile(rows.path, repo_rows(args))  # finished rows travel with the repository


def repo_rows(args):
    """The committed copy of a target's rows (one file per target: the sources are part of each row's key)."""
    return REPO / "benchmarks" / f"paper_comparison_rows_{args.target}.jsonl"


def main(argv=None):
    args = parse(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)  # RecBole's log/ and log_tensorboard/ go there, not into the repository
    path = Path(args.workdir) / "rows.jsonl"
    if not path.exists() and repo_rows(args).exists():  # a new machine: go on from the rows finished elsewhere
        shutil.copyfile(repo_rows(args), path)
    rows = Rows(path)
    other = {r.get("target") for r in rows.rows} - {args.target}
    if other:  # Pop/EASE rows are keyed without the target: another target's rows must never be reused
        sys.exit(f"{rows.path} holds rows of target {sorted(map(str, other))[0]!r}, not {args.target!r}: "
                 f"give another --workdir")
    if not args.report_only:
        for name in BASELINES:
            if run_baseline(args, rows, name):
                report(args, rows)
        for case, sources in cases(args):
            run_case(args, rows, case, sources, lambda: report(args, rows))
        if args.rescore:
            run_rescore(args, rows, lambda: report(args, rows))
    report(args, rows)
    print("rows:", ", ".join(r["key"] for r in rows.rows), flush=True)


if __name__ == "__main__":
    main()
