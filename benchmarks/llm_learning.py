"""Issue 14.4: does LLMRec learn on real data on this CPU? A resumable learning curve with paired intervals.

LLMRec (the embedded SmolLM2-135M, LoRA) on a whole shared domain, evaluated on the same seeded test users and uni29
candidates as Pop, EASE and SASRec, after N training prompts for each N of ``--points`` (one training run whose
cosine schedule spans the largest N; the curve is read off it at each N). Every finished row is appended to
``<workdir>/rows.jsonl`` with its per-user metrics; after each point the adapter, optimizer and scheduler are saved,
so a killed run resumes at the last finished point. The RESULTS.md section and a chart are rewritten after every
row: mean NDCG@5 / Hit@5 and the paired bootstrap 95% interval of each row's difference to zero-shot and to Pop.

    nohup nice -n 5 python benchmarks/llm_learning.py --workdir /work/logs/learning > /work/logs/learning.log 2>&1 &

Prompt variants (``--variant``, each its own curve): short (history 5 titles, no candidate list), listed (the 30
candidates listed in the prompt, as the paper), hist10 (history 10), title6 (titles cut to 6 tokens).
"""
import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.results import write_section  # noqa: E402

SECTION = "LLM learning curve (issue 14.4)"
DEFAULT_TARGET = "amazon-sports"  # the reference's own target; any other target gets its own section, rows, chart


def outputs(target):
    """(RESULTS.md section, finished rows kept with the code, chart) of a target's curve."""
    here = Path(__file__)
    if target == DEFAULT_TARGET:
        return SECTION, here.with_name("llm_learning_rows.jsonl"), here.with_name("llm_learning.png")
    return (f"LLM learning curve on {target} (issues 14.4, 21.4)", here.with_name(f"llm_learning_rows_{target}.jsonl"),
            here.with_name(f"llm_learning_{target}.png"))
VARIANTS = {
    "short": {"prompt_candidates": False, "max_history": 5, "max_title_tokens": 10},
    "listed": {"prompt_candidates": True, "max_history": 5, "max_title_tokens": 10},
    "hist10": {"prompt_candidates": False, "max_history": 10, "max_title_tokens": 10},
    "title6": {"prompt_candidates": False, "max_history": 5, "max_title_tokens": 6},
}
DEFAULT_LR, DEFAULT_BATCH = 5e-4, 8  # the first curve's; other values get their own curve label
KEYS = ["ndcg@5", "hit@5", "ndcg@10", "hit@1", "mrr@5"]


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="default: /work/logs/learning (amazon-sports), "
                                                   "/work/logs/learning-TARGET otherwise")
    p.add_argument("--data-path", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--target", default=DEFAULT_TARGET)
    p.add_argument("--title-field", default=None, help="the target's title field when it is not 'title' (ml-100k: "
                                                       "movie_title)")
    p.add_argument("--title-fallback-field", default="categories",
                   help="field used where a title is missing ('none': no fallback; ml-100k has no categories)")
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--variant", default="short", choices=sorted(VARIANTS))
    p.add_argument("--points", default="0,512,2048,8192", help="training prompts at which the curve is read")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    p.add_argument("--llm-score", default="mean", choices=["mean", "sum"],
                   help="sum: score the curve's zero-shot model and its saved training state (the last point it "
                        "reached) with each answer's log-probability instead of its length-normalised one; no training")
    p.add_argument("--tag", default="", help="a suffix naming a new curve, for example one whose schedule spans more "
                                             "prompts than an earlier curve of the same variant")
    p.add_argument("--sasrec-epochs", type=int, default=10)
    p.add_argument("--baselines", default="Pop,EASE,SASRec")
    p.add_argument("--report-only", action="store_true", help="rewrite the RESULTS.md section from rows.jsonl")
    return p.parse_args()


class Rows:
    """rows.jsonl: one finished row per line (appended atomically enough for one writer: a line is written whole)."""

    def __init__(self, path):
        self.path = Path(path)
        self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()] \
            if self.path.exists() else []

    def get(self, key):
        return next((r for r in self.rows if r["key"] == key), None)

    def add(self, row):
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())


def common(args):
    return {"data_path": args.data_path, "eval_mode": "uni29", "metrics": ["NDCG", "Hit", "MRR"],
            "topk": [1, 5, 10], "valid_metric": "NDCG@5", "eval_sample_users": args.users, "seed": 2020,
            "show_progress": False, "checkpoint_dir": str(Path(args.workdir) / "saved"), **text_settings(args)}


def text_settings(args):
    """The target's title settings, as a domain setting (so they hold for that domain only)."""
    own = {}
    if args.title_field:
        own["title_field"] = args.title_field
    # amazon-sports has items titled "null", some without a brand: their categories stand in
    own["title_fallback_field"] = None if args.title_fallback_field == "none" else args.title_fallback_field
    return {"domain_settings": {args.target: own}}


def setup(model, args, extra):
    from recbole_weaverec.quick_start import build_config, get_trainer_class, prepare

    config = build_config(model, args.target, config_dict={**common(args), **extra})
    _, train, valid, test = prepare(config)
    net = config.model_class(config, train._dataset).to(config["device"])
    trainer = get_trainer_class(config, config.model_class)(config, net)
    return config, net, trainer, train, valid, test


def metric_row(key, users, values, **info):
    return {"key": key, "target": TARGET[0], "users": users.tolist(), "metrics": {k: values[k].tolist() for k in KEYS}, **info,
            "finished": time.strftime("%Y-%m-%d %H:%M")}


def baseline(args, rows, name):
    from recbole_weaverec.stats import per_user_metrics

    key = f"baseline/{name}"
    if rows.get(key):
        return
    extra = {"SASRec": {"epochs": args.sasrec_epochs, "stopping_step": 3, "train_batch_size": 2048,
                        "loss_type": "CE", "train_neg_sample_args": None}}.get(name, {})
    start = time.time()
    _, net, trainer, train, valid, test = setup(name, args, extra)
    trainer.fit(train, valid, saved=False, show_progress=False)
    if hasattr(net, "before_test"):
        net.before_test(valid)
    users, values = per_user_metrics(trainer, test)
    rows.add(metric_row(key, users, values, model=name, seconds=time.time() - start))
    print(key, f"ndcg@5 {np.mean(values['ndcg@5']):.4f}", flush=True)


def llm_curve(args, rows):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from recbole_weaverec.model.llm.training import LoraLearner
    from recbole_weaverec.model.llm.samples import mix_samples

    points = sorted(int(p) for p in args.points.split(","))
    label = curve_label(args)
    if args.llm_score != "mean":
        return rescore(args, rows, label)
    done = [p for p in points if rows.get(f"llm/{label}/{p}")]
    if len(done) == len(points):
        return
    spans = {r["settings"]["max_train_samples"] for r in rows.rows
             if r["key"].startswith(f"llm/{label}/") and r.get("n") and r.get("settings")}
    if spans - {max(points[-1], 1)}:  # a curve is one schedule: going on past its end would train at lr ~0
        sys.exit(f"curve {label!r} was trained on a schedule over {sorted(spans)[0]} prompts, not "
                 f"{max(points[-1], 1)}: name a new curve with --tag")
    extra = {**VARIANTS[args.variant], "max_train_samples": max(points[-1], 1), "learning_rate": args.lr,
             "train_batch_size": args.batch, "gradient_accumulation_steps": 1, "epochs": 1}
    config, net, trainer, _, _, test = setup("LLMRec", args, extra)
    samples = mix_samples([net.samples], seed=2020)  # a seeded order: the first N are a random N
    learner = LoraLearner(net.llm, net.settings, len(samples))
    state = Path(args.workdir) / f"state-{label}"
    seconds, cpu, position = 0.0, 0.0, 0
    if done and (state / "trainer.pt").is_file():  # resume after the last finished point
        saved = torch.load(state / "trainer.pt", weights_only=True)
        set_peft_model_state_dict(net.llm, saved["lora"])
        learner.optimizer.load_state_dict(saved["optimizer"])
        learner.scheduler.load_state_dict(saved["scheduler"])
        seconds, position, learner.tokens = saved["seconds"], saved["position"], saved["tokens"]
        cpu = saved.get("cpu_seconds", 0.0)
        print(f"resumed {label} at N={position} ({seconds:.0f} s of training)", flush=True)
    for i, n in enumerate(points):
        key = f"llm/{label}/{n}"
        if rows.get(key) or (n == 0 and rows.get(f"llm/{args.variant}/0")):  # one zero-shot row per prompt variant
            continue
        train_loss = None
        if n > position:
            start, start_cpu = time.perf_counter(), time.process_time()
            # the mean answer-token loss over these prompts, measured before each step on them: a training curve
            train_loss = learner.epoch(samples[position:n], net.builder, net.domains, epoch=i, progress=False)
            seconds += time.perf_counter() - start
            cpu += time.process_time() - start_cpu
            position = n
        users, values, scoring = score_point(net, trainer, test)
        state.mkdir(parents=True, exist_ok=True)
        torch.save({"lora": get_peft_model_state_dict(net.llm), "optimizer": learner.optimizer.state_dict(),
                    "scheduler": learner.scheduler.state_dict(), "seconds": seconds, "position": position,
                    "tokens": learner.tokens, "cpu_seconds": cpu}, state / "trainer.tmp")
        os.replace(state / "trainer.tmp", state / "trainer.pt")
        rows.add(metric_row(key, users, values, model="LLMRec", variant=label, n=n, train_seconds=seconds,
                            cpu_seconds=cpu, train_loss=train_loss, tokens=learner.tokens, s_per_user=scoring,
                            settings=extra, load=os.getloadavg()[0]))
        print(key, f"ndcg@5 {np.mean(values['ndcg@5']):.4f} after {seconds:.0f} s", flush=True)
        report(args, rows)


def score_point(net, trainer, test):
    """Per-user test metrics and s/user of the current LoRA, merged to score at the base model's cost and unmerged
    again (to go on training)."""
    from recbole_weaverec.stats import per_user_metrics

    net.llm.merge_adapter()
    start = time.perf_counter()
    users, values = per_user_metrics(trainer, test)
    scoring = (time.perf_counter() - start) / len(users)
    net.llm.unmerge_adapter()
    return users, values, scoring


def rescore(args, rows, label):
    """``--llm-score sum``: the zero-shot model and the curve's saved state (its last point), scored by the other
    rule; rows ``llm/<curve>-<rule>/<N>``. Nothing is trained (the scoring rule does not change training)."""
    from peft import set_peft_model_state_dict

    state = Path(args.workdir) / f"state-{curve_label(args, score=False)}" / "trainer.pt"
    if not state.is_file():
        sys.exit(f"{state} not found: train the curve first (the same arguments without --llm-score)")
    saved = torch.load(state, weights_only=True)
    extra = {**VARIANTS[args.variant], "max_train_samples": max(saved["position"], 1), "llm_score": args.llm_score}
    config, net, trainer, _, _, test = setup("LLMRec", args, extra)
    for n in (0, saved["position"]):
        key = f"llm/{label}/{n}"
        if rows.get(key):
            continue
        if n:
            set_peft_model_state_dict(net.llm, saved["lora"])
        users, values, scoring = score_point(net, trainer, test)
        seconds = saved["seconds"] if n else 0.0
        rows.add(metric_row(key, users, values, model="LLMRec", variant=label, n=n, train_seconds=seconds,
                            cpu_seconds=saved.get("cpu_seconds", 0.0) if n else 0.0, train_loss=None,
                            tokens=saved["tokens"] if n else 0, s_per_user=scoring,
                            settings={**extra, "learning_rate": args.lr, "train_batch_size": args.batch},
                            load=os.getloadavg()[0]))
        print(key, f"ndcg@5 {np.mean(values['ndcg@5']):.4f}", flush=True)
        report(args, rows)


def text_note(args):
    own = text_settings(args)["domain_settings"][args.target]
    return "; " + ", ".join(f"{k}={v}" for k, v in own.items()) if own else ""


def curve_label(args, score=True):
    """The curve's name in row keys: the variant, plus the learning rate and batch when not the defaults, the tag,
    and the scoring rule when not the default (``score=False``: the name of the training run it scores)."""
    label = args.variant
    if args.lr != DEFAULT_LR:
        label += f"-lr{args.lr:g}"
    if args.batch != DEFAULT_BATCH:
        label += f"-b{args.batch}"
    label += f"-{args.tag}" if args.tag else ""
    return label + (f"-{args.llm_score}" if score and args.llm_score != "mean" else "")


def aligned(row, ref):
    """``row``'s per-user metrics in the user order of ``ref`` (both must hold the same users)."""
    index = {u: i for i, u in enumerate(row["users"])}
    if set(index) != set(ref["users"]):
        raise ValueError(f"{row['key']} and {ref['key']} were evaluated on different users")
    order = [index[u] for u in ref["users"]]
    return {k: np.asarray(v)[order] for k, v in row["metrics"].items()}


def report(args, rows):
    from recbole_weaverec.stats import paired_difference

    llm = sorted((r for r in rows.rows if r["key"].startswith("llm/")), key=lambda r: (r["variant"], r["n"]))
    base = [r for r in rows.rows if r["key"].startswith("baseline/")]
    pop = rows.get("baseline/Pop")
    table = ["| model | training prompts | training time | train loss | NDCG@5 | Hit@5 | Δ NDCG@5 vs zero-shot [95% CI] | "
             "Δ NDCG@5 vs Pop [95% CI] |", "|---|---|---|---|---|---|---|---|"]

    def ci(row, ref):
        if ref is None or ref is row:
            return "—"
        d = paired_difference(aligned(row, ref)["ndcg@5"], aligned(ref, ref)["ndcg@5"])
        return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"

    for r in base:
        m = aligned(r, r)
        table.append(f"| {r['model']} | — | {r['seconds']:.0f} s (fit) | — | {m['ndcg@5'].mean():.4f} | "
                     f"{m['hit@5'].mean():.4f} | — | {ci(r, pop)} |")
    for r in llm:
        zero = rows.get(f"llm/{r['variant']}/0") or rows.get(f"llm/{r['variant'].split('-')[0]}/0")
        m = aligned(r, r)
        loss = f"{r['train_loss']:.3f}" if r.get("train_loss") is not None else "—"
        cpu = f" ({r['cpu_seconds']:.0f} CPU s)" if r.get("cpu_seconds") else ""
        table.append(f"| LLMRec ({r['variant']}) | {r['n']} | {r['train_seconds']:.0f} s{cpu} | {loss} | "
                     f"{m['ndcg@5'].mean():.4f} | {m['hit@5'].mean():.4f} | {ci(r, zero)} | {ci(r, pop)} |")
    speed = [f"{r['variant']} N={r['n']}: {r['tokens'] / r['train_seconds']:.0f} tok/s training, "
             f"{r['s_per_user']:.2f} s/user scoring" for r in llm if r["train_seconds"] > 0]
    n_users = len(llm[0]["users"]) if llm else (len(base[0]["users"]) if base else 0)
    spans = sorted({f"{r['variant']}: {r['settings']['max_train_samples']} prompts, lr {r['settings']['learning_rate']:g}, "
                    f"batch {r['settings']['train_batch_size']}" for r in llm})
    body = "\n".join(table) + f"""

- Target `{args.target}` (whole domain, shared data{text_note(args)}), test split, uni29 (true next item + 29 sampled, identical for
  every row), **{n_users} seeded test users**; per-user NDCG@5 from RecBole's evaluator (`stats.per_user_metrics`),
  intervals: paired bootstrap over users (scipy, 10,000 resamples, percentile). An interval containing 0 is "no
  difference".
- LLMRec: embedded SmolLM2-135M-Instruct, LoRA r=16/α=32 on all linear layers, one training run per curve whose
  cosine schedule spans the largest N (bf16 training, fp32 scoring with the adapter merged); "training prompts" =
  prompts seen so far; "train loss" = mean answer-token loss on the prompts since the previous point, each taken
  before the step on it (where recorded). N=0 is the zero-shot model of the prompt variant. Each curve's schedule:
  {"; ".join(spans) or "—"} (a curve read before its end is still mid-schedule).
- Variants: {", ".join(f"{k} = {v}" for k, v in VARIANTS.items())}.
- Speed: {"; ".join(speed) or "—"}. Load average at the last row: {os.getloadavg()[0]:.1f}.
- Rows: `{Path(args.workdir) / "rows.jsonl"}` (copied to `benchmarks/{outputs(args.target)[1].name}`); resumable (`--workdir` again).
"""
    section, repo_rows, chart_path = outputs(args.target)
    write_section(section, body, command=f"python benchmarks/llm_learning.py --variant {args.variant} "
                                          f"--points {args.points} --users {args.users} --target {args.target}"
                                          + "".join(f" --{k.replace('_', '-')} {v}" for k, v in (
                                              ("title_field", args.title_field),
                                              ("title_fallback_field", args.title_fallback_field), ("tag", args.tag))
                                              if v and
                                              (k, v) != ("title_fallback_field", "categories"))
                                          + (f" --llm-score {args.llm_score}" if args.llm_score != "mean" else ""))
    chart(llm, base, chart_path)
    if rows.path.resolve() != repo_rows.resolve():
        shutil.copyfile(rows.path, repo_rows)


def chart(llm, base, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for variant in sorted({r["variant"] for r in llm}):
        pts = [r for r in llm if r["variant"] == variant]
        x = [max(r["n"], 1) for r in pts]
        ax.plot(x, [np.mean(r["metrics"]["ndcg@5"]) for r in pts], marker="o", label=f"LLMRec ({variant})")
    for r in base:
        ax.axhline(np.mean(r["metrics"]["ndcg@5"]), linestyle="--", color="grey")
        ax.annotate(r["model"], (1, np.mean(r["metrics"]["ndcg@5"])), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("training prompts seen (N=0 plotted at 1)")
    ax.set_ylabel("test NDCG@5 (uni29)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


TARGET = [DEFAULT_TARGET]  # the run's target, written into every row


def main():
    args = parse()
    if not re.fullmatch(r"[A-Za-z0-9]*", args.tag):  # it names a folder
        sys.exit(f"--tag {args.tag!r}: letters and digits only")
    TARGET[0] = args.target
    if args.workdir is None:
        args.workdir = "/work/logs/learning" + ("" if args.target == DEFAULT_TARGET else f"-{args.target}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    path = Path(args.workdir) / "rows.jsonl"
    repo_rows = outputs(args.target)[1]
    if not path.exists() and repo_rows.exists():  # a new machine: start from the rows finished elsewhere (without
        shutil.copyfile(repo_rows, path)  # the saved training state, an unfinished curve retrains from 0)
    rows = Rows(path)
    other = {r.get("target", DEFAULT_TARGET) for r in rows.rows} - {args.target}
    if other:
        sys.exit(f"{path} holds rows of target {sorted(other)[0]!r}, not {args.target!r}: give another --workdir")
    if not args.report_only:
        for name in [b for b in args.baselines.split(",") if b and b != "SASRec"]:
            baseline(args, rows, name)
        report(args, rows)
        llm_curve(args, rows)
        if "SASRec" in args.baselines.split(","):
            baseline(args, rows, "SASRec")
    report(args, rows)


if __name__ == "__main__":
    main()
