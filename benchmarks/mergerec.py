"""MergeRec on the four shared Amazon domains: domain models vs training-free merges vs learned coefficients.

Scale (this is a shared 2-core CPU): each domain is a slice of ``--users`` random users (whole sequences, the
items they touched; ``--users 0``: the whole domains), TextSeqRec on the embedded all-MiniLM-L6-v2 with short texts,
``--epochs`` fine-tuning epoch(s) per domain, ``--steps`` coefficient-learning steps, once per ``--merge-seeds`` seed
(the pseudo-users and batches it draws). Evaluation: RecBole's evaluator, full ranking over each slice's catalogue,
test split (leave-one-out), per-user values kept: paired 95% intervals over test users (``mergerec_report``).
Fine-tuned domain models and finished rows are cached, so a rerun goes on where it stopped.

    python benchmarks/mergerec.py --users 1000 --steps 200 --merge-seeds 0,1,2
    python benchmarks/mergerec.py --cost [--cost-users 1500]   # merge learning vs one fine-tuning epoch
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import recbole_weaverec  # noqa: E402,F401

from benchmarks import mergerec_report as rep  # noqa: E402
from benchmarks.mergerec_cost import PeakRSS, cost  # noqa: E402
from benchmarks.results import write_section  # noqa: E402
from recbole_weaverec.files import write_text  # noqa: E402

DOMAINS = ["amazon-beauty", "amazon-sports", "amazon-toys", "amazon-pantry"]
SHARED = REPO.parent / "shared" / "data"
TITLE = "MergeRec: merging per-domain text two-tower models"


def write_slices(out, users, seed):
    from recbole_weaverec.testing import write_slice

    for d in DOMAINS:
        if not (out / d / f"{d}.inter").is_file():
            write_slice(SHARED, d, out, n_users=users, seed=seed)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=400, help="users sampled per domain (0: the whole domains)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="coefficient-learning steps (paper: 500)")
    p.add_argument("--merge-seeds", default="0,1,2",
                   help="seeds of the merge learning (pseudo-users, batches); the domain models are the same")
    p.add_argument("--max-user-tokens", type=int, default=64)
    p.add_argument("--max-item-tokens", type=int, default=None, help="cut of the whole item text (the old cut: 24)")
    p.add_argument("--max-attribute-tokens", type=int, default=32, help="tokens per attribute value (official: 32)")
    p.add_argument("--pooling", choices=["cls", "mean"], default=None, help="default: mean for the embedded MiniLM")
    p.add_argument("--accumulation", type=int, default=1, help="gradient_accumulation_steps (official batch 256)")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="then linear decay to 0 (official: 100 steps)")
    p.add_argument("--stopping-step", type=int, default=3, help="early stopping on valid NDCG@10 (with --epochs > 1)")
    p.add_argument("--layer-groups", choices=["others", "modules"], default="others",
                   help="layer-wise groups: each layer + one 'others' (official) or one per other module")
    p.add_argument("--max-seq-items", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (paper: 5e-5, many more steps)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="encoder precision (default: the model's auto = fp32 on a CPU; bf16 = autocast, faster on AMX)")
    p.add_argument("--valid-ratio", type=float, default=0.05,
                   help="share of each domain's pseudo-users held out of the merge learning: every row's distillation "
                        "objective is measured on them, and the learner keeps its best coefficients (0: off)")
    p.add_argument("--valid-every", type=int, default=100, help="merge steps between held-out evaluations")
    p.add_argument("--work", default="/tmp/mergerec_bench")
    p.add_argument("--seed", type=int, default=0, help="the slices' users and the domain models' fine-tuning")
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    p.add_argument("--cost", action="store_true", help="merge learning vs one fine-tuning epoch (bundled samples)")
    p.add_argument("--cost-users", type=int, default=1500, help="--cost: users per sample domain (all: 1500)")
    p.add_argument("--cost-vectors", default="float32,bfloat16",
                   help="--cost: merge_vector_dtype values to measure each merge with (comma-separated)")
    p.add_argument("--vector-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="merge_vector_dtype: storage of the stacked task vectors while merging")
    args = p.parse_args(argv)
    try:
        args.merge_seeds = [int(s) for s in args.merge_seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--merge-seeds {args.merge_seeds!r}: comma-separated integers, e.g. 0,1,2")
    if not args.merge_seeds or args.users < 0:
        p.error("--merge-seeds needs at least one seed and --users must be >= 0")
    if not 0 <= args.valid_ratio < 1 or args.valid_every < 1:
        p.error(f"--valid-ratio {args.valid_ratio} / --valid-every {args.valid_every}: a share in [0, 1) and a "
                f"step count >= 1")
    return args


def _per_user(records):
    """{domain: {"users": [...], metric: [...]}} from ``evaluate_domains``' per-user records."""
    out = {}
    for d, (users, values) in records.items():
        if users is None:
            raise RuntimeError(f"{d}: the evaluation gave no user ids")
        out[d] = {"users": [str(u) for u in users], **{m: [float(v) for v in values[m]] for m in rep.METRICS}}
    return out


def describe(args, sizes):
    who = (f"{args.users} random users per domain (whole sequences, seed {args.seed}; items = those they touched)"
           if args.users else "the whole domains")
    return (f"Scale: {who}, TextSeqRec on the embedded "
            f"all-MiniLM-L6-v2 (22.7M parameters, {args.pooling or 'mean'} pooling, {args.precision or 'fp32'}), "
            f"each item attribute ≤ "
            f"{args.max_attribute_tokens} tokens (whole item text ≤ {args.max_item_tokens or 'any'}), user text ≤ "
            f"{args.max_user_tokens} tokens from the {args.max_seq_items} most recent items, ≤ {args.epochs} "
            f"fine-tuning epoch(s) per domain (AdamW {args.lr:g}, warmup {args.warmup_ratio:g} then linear decay, "
            f"batch 32 × {args.accumulation} accumulated, in-batch softmax, temperature 0.05, early stopping on valid "
            f"NDCG@10 after {args.stopping_step} evaluations without gain), {args.steps} coefficient-learning steps "
            f"(paper: 500) per merge seed ({', '.join(map(str, args.merge_seeds))}), batch 16, Adam 1e-3, "
            f"CE + 1000·KL at T=0.05, layer-wise groups: {args.layer_groups}, task vectors stored in "
            f"{args.vector_dtype}, {args.valid_ratio:g} of each "
            f"domain's pseudo-users held out of the learning (held-out loss every {args.valid_every} steps, best "
            f"coefficients kept). Full ranking over each slice's catalogue "
            f"(history items included, as officially), test split, RecBole's evaluator. Slices: {'; '.join(sizes)}. "
            f"The paper's scale (full domains, RoBERTa-base encoders, 512-token users, GPU) is far beyond this shared "
            f"2-core CPU, so the numbers compare the methods with each other here, not with the paper.")


def cost_tables(ft_stats, learn_stats):
    lines = ["Cost (wall clock; memory = peak RSS growth during the step):", "",
             "| domain | fine-tuning epoch s | fine-tune + valid s | peak RSS growth MB | peak RSS MB |",
             "|---|---|---|---|---|"]
    lines += [f"| {d} | {s['epoch_s']:.0f} | {s['total_s']:.0f} | {s['delta_mb']:.0f} | {s['peak_mb']:.0f} |"
              for d, s in ft_stats.items()]
    lines += ["", "| merge learning | loop s | teacher encoding s | whole merge s | peak RSS growth MB | peak RSS MB | "
              "batch loss, mean of first 20 → last 20 |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n.replace(' | ', ', ')} | {s['learn_s']:.0f} | {s['teacher_s']:.0f} | {s['total_s']:.0f} | "
              f"{s['delta_mb']:.0f} | {s['peak_mb']:.0f} | {s['first_loss']:.3f} → {s['last_loss']:.3f} |" for n, s in learn_stats.items()]
    if ft_stats and learn_stats:
        epoch = statistics.mean(s["epoch_s"] for s in ft_stats.values())
        # median: the first domain's growth also holds one-off allocations (libraries, tokenizer caches)
        peak = statistics.median(s["delta_mb"] for s in ft_stats.values())
        lines.append("")
        lines += [f"- {n}: learning loop / mean fine-tuning epoch = {s['learn_s'] / epoch:.2f}× time (incl. teacher "
                  f"encoding {(s['learn_s'] + s['teacher_s']) / epoch:.2f}×); peak memory growth {s['delta_mb']:.0f} "
                  f"MB vs {peak:.0f} MB ({s['delta_mb'] / max(peak, 1):.2f}×)" for n, s in learn_stats.items()]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.cost:
        return cost(args)

    from recbole.data import create_dataset
    from recbole.utils import init_logger

    from recbole_weaverec.model.twotower import domains as dm
    from recbole_weaverec.model.twotower.mergerec import MergePipeline, MergeRec
    from recbole_weaverec.quick_start import build_config
    from recbole_weaverec.textembed import resolve_encoder_path

    work = Path(args.work)
    scale = f"{args.users}u" if args.users else "all"
    data = work / f"data-{args.users}u-s{args.seed}" if args.users else SHARED
    if args.users:
        write_slices(data, args.users, args.seed)
    target = "amazon-toys"
    cfg = {"data_path": str(data), "merge_domains": DOMAINS, "merge_cache_dir": str(work / "models"),
           "epochs": args.epochs, "train_batch_size": 32, "learning_rate": args.lr,
           "max_user_tokens": args.max_user_tokens, "max_item_tokens": args.max_item_tokens,
           "max_seq_items": args.max_seq_items, "merge_steps": args.steps,
           "max_attribute_tokens": args.max_attribute_tokens, "pooling": args.pooling,
           "gradient_accumulation_steps": args.accumulation, "warmup_ratio": args.warmup_ratio,
           "stopping_step": args.stopping_step, "merge_layer_groups": args.layer_groups,
           **({"merge_vector_dtype": args.vector_dtype} if args.vector_dtype != "float32" else {}),
           **({"merge_valid_ratio": args.valid_ratio, "merge_valid_every": args.valid_every}
              if args.valid_ratio else {}),
           **({"precision": args.precision} if args.precision else {}),
           "show_progress": False, "state": "INFO", "seed": args.seed, "metrics": ["Recall", "NDCG"],
           "topk": [10], "valid_metric": "NDCG@10", "checkpoint_dir": str(work / "saved")}
    base_config = build_config("MergeRec", target, config_dict=cfg)
    init_logger(base_config)
    tconfig = dm.text_config(base_config)
    encoder_path = resolve_encoder_path(tconfig["text_encoder_path"])

    # (0) the domain models, timed (one fine-tuning run per domain); kept beside the cached models
    stats_file = work / "models" / f"finetune-stats-{scale}.json"
    ft_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    paths = {}
    for d in DOMAINS:
        path, _ = dm.finetuned_path(base_config, dm.domain_text_config(tconfig, d), encoder_path)
        paths[d] = str(path)
        if path.is_file():
            continue
        times = []
        with PeakRSS() as mem:
            model = dm.finetune_domain(dm.domain_text_config(tconfig, d), epoch_times=times)
        dm.save_domain_model(path, model.tower.encoder.state_dict(), dm.encoder_meta(model, d))
        ft_stats[d] = {"epoch_s": times[0], "total_s": mem.seconds, "delta_mb": mem.delta_mb, "peak_mb": mem.peak_mb}
        print(f"fine-tuned {d}: {ft_stats[d]}", flush=True)
        write_text(stats_file, json.dumps(ft_stats, indent=1))
        del model

    # Every finished row is stored per settings (rows of other fine-tuning or merging settings never mix in), so an
    # interrupted run resumes where it stopped; the merge seeds are not part of the key: more seeds add rows.
    settings = {k: v for k, v in cfg.items() if k not in ("show_progress", "state", "checkpoint_dir")}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    store = work / f"rows-{scale}-{args.steps}steps-{tag}.json"
    saved = json.loads(store.read_text()) if store.is_file() else {}
    rows, coef_text = saved.get("rows", {}), saved.get("coefficients", {})
    learn_stats, sizes = saved.get("learn", {}), saved.get("sizes", {})
    objectives = saved.get("objective", {})  # row key -> {domain: held-out distillation objective}
    shared_domains = {}

    def pipeline_for(**overrides):
        # the saved domain models, named: a merge seed other than the fine-tuning seed reuses them as they are
        config = build_config("MergeRec", target, config_dict={**cfg, "merge_finetuned": paths, **overrides})
        pipe = MergePipeline(config, MergeRec(config, create_dataset(config).build()[0]))
        pipe._domain = shared_domains  # the per-domain datasets/towers are built once for all rows
        return pipe

    held = {}  # the teachers' embeddings and the held-out pseudo-users, built once (for the objective column)

    def objective(key, pipe, states):
        """Every row's distillation objective on the same held-out pseudo-users, with its own item embeddings."""
        from recbole_weaverec.model.twotower.distill import (held_out_objective, pseudo_users, split_pseudo_users,
                                                             teacher_embeddings)

        if not args.valid_ratio:
            return
        towers = [pipe.domain(d)[0].tower for d in DOMAINS]
        if not held:
            nets = [pipe.domain(d)[0] for d in DOMAINS]
            held["teachers"] = [teacher_embeddings(net.tower, net.n_items, net.encode_batch_size,
                                                   params=dm.load_domain_model(paths[d])[0])
                                for net, d in zip(nets, DOMAINS)]
            held["users"] = split_pseudo_users(pseudo_users([net.n_items for net in nets]), args.valid_ratio)[1]
        c = pipe.config
        objectives[key] = {}
        for i, d in enumerate(DOMAINS):  # one domain at a time: the own-model row has other weights per domain
            only = held["users"]
            mine = type(only)(only.domain[only.domain == i], only.item[only.domain == i])
            objectives[key][d] = held_out_objective(towers, held["teachers"], states(d), mine, c["kd_weight"],
                                                    c["kd_temperature"], pipe.model.encode_batch_size)

    def evaluated(pipe, states, key=None):
        if key is not None:
            objective(key, pipe, states)
        out = {}
        for d in DOMAINS:
            records = []
            pipe.evaluate_state(d, states(d), per_user=records)
            out.update(_per_user({d: records[-1]}))
            net, test, _ = pipe.domain(d)
            sizes[d] = f"{d}: {net.n_items - 1} items, {len(out[d]['users'])} test users"
        return out

    def fixed(key, state_of):
        pipe = pipeline_for(merge_learn=False)
        return evaluated(pipe, lambda d: state_of(pipe, d), key)

    def merged(key, overrides, seed=None):
        pipe = pipeline_for(**overrides, **({} if seed is None else {"seed": seed}))
        with PeakRSS() as mem:
            pipe.run()
        if overrides.get("merge_learn", True):
            learn_stats[key] = {"learn_s": pipe.timings["learn_s"], "teacher_s": pipe.timings["teacher_s"],
                                "total_s": mem.seconds, "delta_mb": mem.delta_mb, "peak_mb": mem.peak_mb,
                                # means of 20 batches each: one batch's loss varies with the items drawn
                                "first_loss": sum(pipe.losses[:20]) / len(pipe.losses[:20]),
                                "last_loss": sum(pipe.losses[-20:]) / len(pipe.losses[-20:]),
                                "valid": getattr(pipe, "valid_losses", []),
                                "kept_step": getattr(pipe, "best_valid_step", None)}
        coef_text[key] = pipe._format_coefficients()
        state = pipe.model.tower.encoder.state_dict()
        return evaluated(pipe, lambda d: state, key)

    task = dict(merge_init="task_arithmetic", merge_granularity="task")
    layer = dict(merge_init="task_arithmetic", merge_granularity="layer")
    first, *more = args.merge_seeds
    # the key comparison first (later rows may not make it before a deadline); then the other merge seeds
    steps = [(rep.FREE[1], None, lambda k: merged(k, dict(merge_init="task_arithmetic", merge_learn=False))),
             (rep.LEARNED[0], first, lambda k: merged(k, task, first)),
             (rep.OWN, None, lambda k: fixed(k, lambda pipe, d: dm.load_domain_model(paths[d])[0])),
             (rep.FREE[2], None, lambda k: merged(k, dict(merge_init="ties", merge_learn=False))),
             (rep.FREE[0], None, lambda k: merged(k, dict(merge_init="average", merge_learn=False))),
             (rep.LEARNED[1], first, lambda k: merged(k, layer, first)),
             (rep.PRETRAINED, None, lambda k: fixed(k, lambda pipe, d: pipe.model.base_state))]
    for s in more:
        steps += [(rep.LEARNED[0], s, lambda k, s=s: merged(k, task, s)),
                  (rep.LEARNED[1], s, lambda k, s=s: merged(k, layer, s))]
    # the official example's other setting: layer-wise coefficients learned from the TIES merge (λ = 1)
    ties_layer = dict(merge_init="ties", merge_granularity="layer")
    steps += [(rep.LEARNED[2], s, lambda k, s=s: merged(k, ties_layer, s)) for s in args.merge_seeds]

    def report(done):
        present = {n: r for n, r in rows.items() if r and all(d in (next(iter(r.values())) if n in rep.LEARNED
                                                                    else r) for d in DOMAINS)}
        found = rep.comparisons(present, DOMAINS)
        parts = ["" if done else "**Partial: the run was still going when this was written.**\n",
                 describe(args, [sizes[d] for d in DOMAINS if d in sizes]), "", rep.table(present, DOMAINS), "",
                 "Paired differences of test NDCG@10 over the same users (scipy bootstrap, 10,000 resamples, "
                 "percentile; learned rows averaged per user over their seeds; the average over domains resamples "
                 "users within each domain, every domain weighing the same). An interval containing 0 is no "
                 "difference.", "", rep.intervals_table(found, DOMAINS), "", *rep.verdicts(found, DOMAINS), "",
                 "Learned / used coefficients:", *[f"- {n}: {c}" for n, c in coef_text.items()], "",
                 rep.objective_table(objectives, learn_stats, present, DOMAINS), "",
                 cost_tables(ft_stats, learn_stats)]
        body = "\n".join(parts)
        print(body, flush=True)
        if not args.no_write:
            # one section per scale and schedule, so a stronger run does not overwrite a weaker one's evidence
            who = f"{args.users} users per domain" if args.users else "whole domains"
            write_section(f"{TITLE} ({who}, {args.epochs} fine-tuning epoch(s), {args.steps} merge steps)", body)

    for name, seed, fn in steps:
        key = name if seed is None else f"{name} | seed {seed}"
        have = rows.get(name, {}).get(str(seed)) if seed is not None else rows.get(name)
        if not have:
            result = fn(key)
            if seed is None:
                rows[name] = result
            else:
                rows.setdefault(name, {})[str(seed)] = result
            print(f"{key}: " + ", ".join(f"{d}: NDCG@10 {statistics.mean(result[d]['ndcg@10']):.4f}"
                                         for d in DOMAINS), flush=True)
            write_text(store, json.dumps({"rows": rows, "coefficients": coef_text, "learn": learn_stats,
                                          "sizes": sizes, "objective": objectives}))
        report(done=False)
    report(done=True)


if __name__ == "__main__":
    main()
