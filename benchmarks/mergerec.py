"""MergeRec on the four shared Amazon domains: domain models vs training-free merges vs learned coefficients.

Scale (this is a shared 2-core CPU): each domain is a slice of ``--users`` random users (whole sequences, the
items they touched), TextSeqRec on the embedded all-MiniLM-L6-v2 with short texts, ``--epochs`` fine-tuning
epoch(s) per domain, ``--steps`` coefficient-learning steps. Evaluation: RecBole's evaluator, full ranking over each
slice's catalogue, test split (leave-one-out). Fine-tuned domain models are cached, so a rerun only merges.

    python benchmarks/mergerec.py --users 400 --steps 200
    python benchmarks/mergerec.py --cost [--cost-users 1500]   # merge learning vs one fine-tuning epoch

``--cost``: the time and peak memory of one fine-tuning epoch per domain and of the merge learning (task- and
layer-wise) on the bundled samples, as ratios; each phase in a fresh process, so no phase's memory hides another's.
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import recbole_weaverec  # noqa: E402,F401
import torch  # noqa: E402

from benchmarks.results import write_section  # noqa: E402

DOMAINS = ["amazon-beauty", "amazon-sports", "amazon-toys", "amazon-pantry"]
SHARED = REPO.parent / "shared" / "data"
METRICS = ("recall@10", "ndcg@10")
DISPLAY = ["fine-tuned domain model (own domain)", "pretrained encoder (no fine-tuning)", "average (λ=1/K)",
           "task arithmetic (λ=0.2)", "TIES (density 0.2, λ=1)", "MergeRec task-wise (TA init)",
           "MergeRec layer-wise (TA init)"]


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms), minus the RSS at entry."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.seconds = time.perf_counter() - self.t0
        self.delta_mb = (self.peak - self.start) / 2**20
        self.peak_mb = self.peak / 2**20


class PeakMemory(PeakRSS):
    """PeakRSS, plus the CUDA allocator's peak growth (which RSS does not see) where a GPU is used."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.cuda_start = torch.cuda.memory_allocated() if self.cuda else 0
        return super().__enter__()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        super().__exit__(*exc)
        cuda_mb = (torch.cuda.max_memory_allocated() - self.cuda_start) / 2**20 if self.cuda else None
        self.stats = {"s": self.seconds, "mb": self.delta_mb if cuda_mb is None else cuda_mb, "cuda": self.cuda}


SAMPLES = ["toys-sample", "beauty-sample", "sports-sample"]


def _cost_finetune(cfg, domain):
    """(child process) One fine-tuning epoch of ``domain``, measured alone (model, data and optimizer built before;
    AdamW's state is made in the epoch and counted); the model is saved where the merge reads it."""
    from recbole_weaverec.model.twotower import domains as dm
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer
    from recbole_weaverec.quick_start import build_config
    from recbole_weaverec.textembed import resolve_encoder_path

    config = build_config("MergeRec", domain, config_dict=cfg)
    tconfig, epoch, out = dm.text_config(config), TextSeqRecTrainer._train_epoch, {}

    def measured(self, train_data, *args, **kwargs):
        with PeakMemory() as mem:
            loss = epoch(self, train_data, *args, **kwargs)
        out.update(mem.stats, detail=f"{len(train_data)} batches")
        return loss

    TextSeqRecTrainer._train_epoch = measured
    model = dm.finetune_domain(tconfig)
    path, _ = dm.finetuned_path(config, tconfig, resolve_encoder_path(tconfig["text_encoder_path"]))
    dm.save_domain_model(path, model.tower.encoder.state_dict(), dm.encoder_meta(model, domain))
    return out


def _cost_merge(cfg, granularity):
    """(child process) The merge of the saved domain models, measured from after every domain's data and item
    texts are built: reading the models, task vectors, teachers, student items, learning loop, merged weights."""
    from recbole.data import create_dataset
    from recbole_weaverec.model.twotower.mergerec import MergePipeline, MergeRec
    from recbole_weaverec.quick_start import build_config

    config = build_config("MergeRec", SAMPLES[0], config_dict={**cfg, "merge_granularity": granularity})
    pipe = MergePipeline(config, MergeRec(config, create_dataset(config).build()[0]).to(config["device"]))
    [pipe.domain(d) for d in pipe.domains]  # the domains' data and item texts: built before the measure
    with PeakMemory() as mem:
        pipe.run()
    t = pipe.timings
    return {**mem.stats, "learning_s": t["teacher_s"] + t["student_items_s"] + t["learn_s"], "loop_s": t["learn_s"],
            "detail": f"teachers {t['teacher_s']:.1f} s, student items {t['student_items_s']:.1f} s, loop "
                      f"{t['learn_s']:.1f} s ({len(pipe.losses)} steps); whole merge {mem.seconds:.1f} s"}


def cost(args):
    """Merge learning vs one fine-tuning epoch in one run (``--cost``), each phase in a fresh process."""
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from recbole_weaverec.testing import write_slice

    work = Path(args.work)
    data = work / f"cost-data-{args.cost_users}u-s{args.seed}"
    for d in SAMPLES:
        if not (data / d / f"{d}.inter").is_file():
            write_slice(REPO / "recbole_weaverec" / "dataset", d, data, n_users=args.cost_users, seed=args.seed)
    models = Path(tempfile.mkdtemp(prefix="cost-models-", dir=work))  # empty: every domain is really fine-tuned
    cfg = {"data_path": str(data), "merge_domains": SAMPLES, "merge_cache_dir": str(models), "epochs": 1,
           "train_batch_size": 32, "learning_rate": args.lr, "max_user_tokens": args.max_user_tokens,
           "max_item_tokens": args.max_item_tokens, "max_attribute_tokens": args.max_attribute_tokens,
           "max_seq_items": args.max_seq_items, "pooling": args.pooling, "merge_steps": args.steps,
           "show_progress": False, "state": "WARNING", "seed": args.seed, "checkpoint_dir": str(models / "saved")}
    rows = {}
    try:
        for name, fn, arg in [*((f"fine-tuning epoch: {d}", _cost_finetune, d) for d in SAMPLES),
                              *((f"merge learning: {g}-wise", _cost_merge, g) for g in ("task", "layer"))]:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
                rows[name] = pool.submit(fn, cfg, arg).result()
            print(name, rows[name], flush=True)
    finally:
        shutil.rmtree(models, ignore_errors=True)
    epochs = [r for n, r in rows.items() if n.startswith("fine-tuning")]
    epoch_s, epoch_mb = statistics.mean(r["s"] for r in epochs), statistics.median(r["mb"] for r in epochs)
    memory = "CUDA allocator" if epochs[0]["cuda"] else "resident set, sampled every 50 ms"
    lines = [f"Bundled samples, {args.cost_users} users each (seed {args.seed}); TextSeqRec on the embedded MiniLM, "
             f"batch 32, user text ≤ {args.max_user_tokens} tokens; merge: {args.steps} steps of 16 pseudo-users. "
             f"Load average at the end: {os.getloadavg()[0]:.1f} (on a shared machine compare the ratios of one run, "
             f"not times across runs). Memory: peak growth during the phase ({memory}).", "",
             "| phase | s | peak growth MB | detail |", "|---|---|---|---|"]
    lines += [f"| {n} | {r.get('learning_s', r['s']):.1f} | {r['mb']:.0f} | {r['detail']} |" for n, r in rows.items()]
    lines += [""] + [f"- {n}: {r['learning_s'] / epoch_s:.2f}× the mean fine-tuning epoch's time (loop alone "
                     f"{r['loop_s'] / epoch_s:.2f}×), {r['mb'] / max(epoch_mb, 1):.2f}× its median peak memory growth"
                     for n, r in rows.items() if "learning_s" in r]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("MergeRec: merge learning vs one fine-tuning epoch", body)


def write_slices(out, users, seed):
    from recbole_weaverec.testing import write_slice

    for d in DOMAINS:
        if not (out / d / f"{d}.inter").is_file():
            write_slice(SHARED, d, out, n_users=users, seed=seed)


fmt = "{:.4f}".format


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=400, help="users sampled per domain")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=200, help="coefficient-learning steps (paper: 500)")
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
    p.add_argument("--work", default="/tmp/mergerec_bench")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only, do not touch RESULTS.md")
    p.add_argument("--cost", action="store_true", help="merge learning vs one fine-tuning epoch (bundled samples)")
    p.add_argument("--cost-users", type=int, default=1500, help="--cost: users per sample domain (all: 1500)")
    args = p.parse_args(argv)
    if args.cost:
        return cost(args)

    from recbole.data import create_dataset
    from recbole.utils import init_logger

    from recbole_weaverec.model.twotower import domains as dm
    from recbole_weaverec.model.twotower.mergerec import MergePipeline, MergeRec
    from recbole_weaverec.quick_start import build_config
    from recbole_weaverec.textembed import resolve_encoder_path

    work = Path(args.work)
    data = work / f"data-{args.users}u-s{args.seed}"
    write_slices(data, args.users, args.seed)
    target = "amazon-toys"
    cfg = {"data_path": str(data), "merge_domains": DOMAINS, "merge_cache_dir": str(work / "models"),
           "epochs": args.epochs, "train_batch_size": 32, "learning_rate": args.lr, "max_user_tokens": args.max_user_tokens,
           "max_item_tokens": args.max_item_tokens, "max_seq_items": args.max_seq_items, "merge_steps": args.steps,
           "max_attribute_tokens": args.max_attribute_tokens, "pooling": args.pooling,
           "gradient_accumulation_steps": args.accumulation, "warmup_ratio": args.warmup_ratio,
           "stopping_step": args.stopping_step, "merge_layer_groups": args.layer_groups,
           "show_progress": False, "state": "INFO", "seed": args.seed, "metrics": ["Recall", "NDCG"],
           "topk": [10], "valid_metric": "NDCG@10", "checkpoint_dir": str(work / "saved")}

    base_config = build_config("MergeRec", target, config_dict=cfg)
    init_logger(base_config)
    log = print
    tconfig = dm.text_config(base_config)
    encoder_path = resolve_encoder_path(tconfig["text_encoder_path"])

    # (0) domain models, timed: one fine-tuning epoch per domain (time, peak memory); kept beside the cached models
    stats_file = work / "models" / f"finetune-stats-{args.users}u.json"
    ft_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    for d in DOMAINS:
        dconfig = dm.domain_text_config(tconfig, d)
        path, _ = dm.finetuned_path(base_config, dconfig, encoder_path)
        if path.is_file():
            continue
        times = []
        with PeakRSS() as mem:
            model = dm.finetune_domain(dconfig, epoch_times=times)
        dm.save_domain_model(path, model.tower.encoder.state_dict(), dm.encoder_meta(model, d))
        ft_stats[d] = {"epoch_s": times[0], "total_s": mem.seconds, "delta_mb": mem.delta_mb, "peak_mb": mem.peak_mb,
                       "train_rows": None}
        log(f"fine-tuned {d}: {ft_stats[d]}")
        stats_file.write_text(json.dumps(ft_stats, indent=1))
        del model

    shared_domains = {}
    results, coef_text, learn_stats = {}, {}, {}

    def pipeline_for(**overrides):
        config = build_config("MergeRec", target, config_dict={**cfg, **overrides})
        dataset = create_dataset(config).build()[0]
        model = MergeRec(config, dataset)
        pipe = MergePipeline(config, model)
        pipe._domain = shared_domains  # the per-domain datasets/towers are built once for all variants
        return pipe

    def report(done):
        head = "| model | " + " | ".join(f"{d.replace('amazon-', '')} R@10 | N@10" for d in DOMAINS) + \
               " | avg R@10 | avg N@10 |"
        sep = "|" + "---|" * (2 + 2 * len(DOMAINS) + 1)
        rows = [head, sep]
        for name in DISPLAY:
            if name not in results:
                continue
            res = results[name]
            cells = []
            for d in DOMAINS:
                cells += [fmt(res[d]["recall@10"]), fmt(res[d]["ndcg@10"])]
            avg = [sum(res[d][m] for d in DOMAINS) / len(DOMAINS) for m in METRICS]
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(avg[0])} | {fmt(avg[1])} |")
        sizes = []
        for d in DOMAINS:
            if d not in shared_domains:
                continue
            net, test, dconfig = shared_domains[d]
            sizes.append(f"{d}: {net.n_items - 1} items, {len(test._dataset.inter_feat)} test users")
        ft_lines = [f"| {d} | {s['epoch_s']:.0f} | {s['total_s']:.0f} | {s['delta_mb']:.0f} | {s['peak_mb']:.0f} |"
                    for d, s in ft_stats.items()]
        ml_lines = [f"| {n} | {s['learn_s']:.0f} | {s['teacher_s']:.0f} | {s['total_s']:.0f} | {s['delta_mb']:.0f} | "
                    f"{s['peak_mb']:.0f} | {s['first_loss']:.3f} → {s['last_loss']:.3f} |" for n, s in learn_stats.items()]
        ratio = ""
        if ft_stats and learn_stats:
            mean_epoch = sum(s["epoch_s"] for s in ft_stats.values()) / len(ft_stats)
            # median: the first domain's growth also holds one-off allocations (libraries, tokenizer caches)
            mean_peak = statistics.median(s["delta_mb"] for s in ft_stats.values())
            ratio = "\n".join(
                f"- {n}: learning loop / mean fine-tuning epoch = {s['learn_s'] / mean_epoch:.2f}× time "
                f"(incl. teacher encoding {(s['learn_s'] + s['teacher_s']) / mean_epoch:.2f}×); peak memory growth "
                f"{s['delta_mb']:.0f} MB vs {mean_peak:.0f} MB (median of the domains' fine-tuning; {s['delta_mb'] / max(mean_peak, 1):.2f}×)"
                for n, s in learn_stats.items())
        body = ("" if done else "**Partial: the run was still going when this was written.**\n\n") + f"""Scale: {args.users} random users per domain (whole sequences, seed {args.seed}; items = those they touched),
    TextSeqRec on the embedded all-MiniLM-L6-v2 (22.7M parameters, {args.pooling or 'mean'} pooling), each item attribute ≤
    {args.max_attribute_tokens} tokens (whole item text ≤ {args.max_item_tokens or 'any'}), user text ≤ {args.max_user_tokens} tokens from
    the {args.max_seq_items} most recent items, ≤ {args.epochs} fine-tuning epoch(s) per domain (AdamW {args.lr:g}, warmup
    {args.warmup_ratio:g} then linear decay, batch 32 × {args.accumulation} accumulated, in-batch softmax, temperature 0.05,
    early stopping on valid NDCG@10 after {args.stopping_step} evaluations without gain), {args.steps} coefficient-learning
    steps (paper: 500), batch 16, Adam 1e-3, CE + 1000·KL at T=0.05, layer-wise groups: {args.layer_groups}. Full ranking
    over each slice's catalogue (history items included, as officially), test split, RecBole's evaluator.
    Slices: {'; '.join(sizes)}. The paper's scale (full domains, RoBERTa-base encoders, 512-token users, GPU) is far
    beyond this shared 2-core CPU, so the numbers compare the methods with each other here, not with the paper.

    {chr(10).join(rows)}

    Learned / used coefficients:
    {chr(10).join(f'- {n}: {c}' for n, c in coef_text.items())}

    Cost (wall clock on a CPU shared with other jobs, so times are noisy; memory = peak RSS growth during the step):

    | domain | fine-tuning epoch s | fine-tune + valid s | peak RSS growth MB | peak RSS MB |
    |---|---|---|---|---|
    {chr(10).join(ft_lines)}

    | merge learning | loop s | teacher encoding s | whole merge s | peak RSS growth MB | peak RSS MB | loss first → last 20 |
    |---|---|---|---|---|---|---|
    {chr(10).join(ml_lines)}

    {ratio}
    """
        # the template above is indented with the code: no markdown line of it may start with 4 spaces
        body = "\n".join(line[4:] if line.startswith("    ") else line for line in body.split("\n"))
        print(body)
        if not args.no_write:
            write_section("MergeRec: merging per-domain text two-tower models", body)

    # Every finished row is stored (per slice size and step count), so an interrupted run resumes where it stopped.
    # ... and per settings: rows measured with other fine-tuning or merging settings are never mixed in
    settings = {k: v for k, v in cfg.items() if k not in ("show_progress", "state", "checkpoint_dir")}
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    store = work / f"results-{args.users}u-{args.steps}steps-{tag}.json"
    saved = json.loads(store.read_text()) if store.is_file() else {}
    results.update(saved.get("results", {}))
    coef_text.update(saved.get("coefficients", {}))
    learn_stats.update(saved.get("learn", {}))

    def own_models():
        pipe = pipeline_for(merge_learn=False)
        own = {}
        for d in DOMAINS:
            path = dm.finetuned_path(base_config, dm.domain_text_config(tconfig, d), encoder_path)[0]
            own[d] = pipe.evaluate_state(d, dm.load_domain_model(path)[0])
        return own

    def pretrained():
        pipe = pipeline_for(merge_learn=False)
        return {d: pipe.evaluate_state(d, pipe.model.base_state) for d in DOMAINS}

    def merged(name, overrides):
        pipe = pipeline_for(**overrides)
        with PeakRSS() as mem:
            pipe.run()
        if overrides.get("merge_learn", True):
            learn_stats[name] = {"learn_s": pipe.timings["learn_s"], "teacher_s": pipe.timings["teacher_s"],
                                 "total_s": mem.seconds, "delta_mb": mem.delta_mb, "peak_mb": mem.peak_mb,
                                 "first_loss": pipe.losses[0],
                                 "last_loss": sum(pipe.losses[-20:]) / len(pipe.losses[-20:])}
        coef_text[name] = pipe._format_coefficients()
        return pipe.evaluate_domains(pipe.model.tower.encoder.state_dict())

    # the key comparison first (the CPU is shared: later rows may not make it before a deadline)
    steps = [
        ("task arithmetic (λ=0.2)", lambda n: merged(n, dict(merge_init="task_arithmetic", merge_learn=False))),
        ("MergeRec task-wise (TA init)", lambda n: merged(n, dict(merge_init="task_arithmetic",
                                                                  merge_granularity="task"))),
        ("fine-tuned domain model (own domain)", lambda n: own_models()),
        ("TIES (density 0.2, λ=1)", lambda n: merged(n, dict(merge_init="ties", merge_learn=False))),
        ("average (λ=1/K)", lambda n: merged(n, dict(merge_init="average", merge_learn=False))),
        ("MergeRec layer-wise (TA init)", lambda n: merged(n, dict(merge_init="task_arithmetic",
                                                                   merge_granularity="layer"))),
        ("pretrained encoder (no fine-tuning)", lambda n: pretrained()),
    ]
    order = [n for n, _ in steps]
    for name, fn in steps:
        if name not in results:
            results[name] = {d: {m: float(v) for m, v in r.items()} for d, r in fn(name).items()}
            log(f"{name}: {results[name]}  coefficients {coef_text.get(name, '')}")
            store.write_text(json.dumps({"results": results, "coefficients": coef_text, "learn": learn_stats},
                                        indent=1))
        report(done=all(n in results for n in order))


if __name__ == "__main__":
    main()
