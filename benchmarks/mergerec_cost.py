"""MergeRec cost (``python benchmarks/mergerec.py --cost``): the time and peak memory of one fine-tuning epoch per
domain and of the merge learning (task- and layer-wise) on the bundled samples, as ratios of one run; each phase in a
fresh process, so no phase's memory hides another's. ``PeakRSS`` / ``PeakMemory`` measure a block."""
import os
import statistics
import threading
import time
from pathlib import Path

import torch

from benchmarks.results import write_section

REPO = Path(__file__).resolve().parent.parent


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
MERGES = [("task", "task_arithmetic"), ("layer", "task_arithmetic"), ("layer", "ties")]  # the benchmark's learned rows
INIT_NAMES = {"task_arithmetic": "TA", "ties": "TIES"}


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


def _cost_merge(cfg, variant):
    """(child process) The merge of the saved domain models, measured from after every domain's data and item
    texts are built: reading the models, task vectors, teachers, student items, learning loop, merged weights.
    ``variant``: (granularity, merge_init, merge_vector_dtype)."""
    from recbole.data import create_dataset
    from recbole_weaverec.model.twotower.mergerec import MergePipeline, MergeRec
    from recbole_weaverec.quick_start import build_config

    granularity, init, vectors = variant
    config = build_config("MergeRec", SAMPLES[0], config_dict={**cfg, "merge_granularity": granularity,
                                                               "merge_init": init, "merge_vector_dtype": vectors})
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
           "show_progress": False, "state": "WARNING", "seed": args.seed, "checkpoint_dir": str(models / "saved"),
           **({"precision": args.precision} if args.precision else {})}
    rows = {}
    try:
        merges = [(g, init, v) for g, init in MERGES for v in args.cost_vectors.split(",")]
        for name, fn, arg in [*((f"fine-tuning epoch: {d}", _cost_finetune, d) for d in SAMPLES),
                              *((f"merge learning: {g}-wise, {INIT_NAMES[i]} init, {v} task vectors", _cost_merge,
                                 (g, i, v)) for g, i, v in merges)]:
            with ProcessPoolExecutor(1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
                rows[name] = pool.submit(fn, cfg, arg).result()
            print(name, rows[name], flush=True)
    finally:
        shutil.rmtree(models, ignore_errors=True)
    epochs = [r for n, r in rows.items() if n.startswith("fine-tuning")]
    epoch_s, epoch_mb = statistics.mean(r["s"] for r in epochs), statistics.median(r["mb"] for r in epochs)
    memory = "CUDA allocator" if epochs[0]["cuda"] else "resident set, sampled every 50 ms"
    lines = [f"Bundled samples, {args.cost_users} users each (seed {args.seed}); TextSeqRec on the embedded MiniLM, "
             f"batch 32, user text ≤ {args.max_user_tokens} tokens, {args.precision or 'default'} precision; merge: "
             f"{args.steps} steps of 16 pseudo-users. "
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
