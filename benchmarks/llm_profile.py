"""Issue 14.2: where a LoRA training pass spends its CPU time (torch.profiler), and the attention kernels side by side.

One process per variant (an attention kernel, ``+compile`` for compiled decoder layers): a warm-up epoch (timed: it
holds the compiling), a timed epoch and a profiled epoch, each over other prompts (the LLMRec defaults of
``--dataset``, bf16 autocast, gradient checkpointing as configured). Prints and writes to benchmarks/RESULTS.md ("LLM
training profile"): tokens/s per variant, and the share of self CPU time per operator group (matmuls, attention,
element-wise, casts, optimizer) and the top operators.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/llm_profile.py --dataset toys-sample --samples 16 \
        --attention sdpa,eager,sdpa+compile,eager+compile
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GROUPS = (  # (group, operator name fragments), first match wins
    ("matmul (mm/addmm/bmm/linear)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention kernel", ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax")),
    ("dtype casts / copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous")),
    ("optimizer (AdamW)", ("adam", "_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul")),
    ("loss (log-softmax, NLL)", ("log_softmax", "nll_loss", "cross_entropy")),
    ("fused kernels of torch.compile", ("compiledfxgraph", "cpp_fused", "triton_", "compiledfunction",
                                        "torch-compiled", "torchdynamo")),
    ("element-wise (norm, act, rotary, add, mul)", ("aten::",)),
)


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="toys-sample")
    p.add_argument("--samples", type=int, default=16,
                   help="training prompts per epoch (warm-up, timed and profiled: 3 epochs)")
    p.add_argument("--attention", default="sdpa,eager,eager+compile",
                   help="variants to compare: attention kernels, each optionally with +compile (train_compile)")
    p.add_argument("--score-users", type=int, default=6, help="users scored per kernel (fp32, 30 candidates)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an LLMRec config override")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def overrides(args):
    import yaml

    out = {}
    for entry in args.set:
        key, eq, value = entry.partition("=")
        if not (key and eq):
            sys.exit(f"--set {entry!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def group_of(name):
    low = name.lower()
    return next((g for g, parts in GROUPS if any(p.lower() in low for p in parts)), "other (python, autograd, peft)")


def probe(args):
    """In this process: one warm-up epoch, one profiled epoch; prints PROBE {json}."""
    from torch.profiler import ProfilerActivity, profile

    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.model.llm.training import LoraLearner
    from recbole_weaverec.quick_start import build_config, prepare

    kernel, _, compiled = args.probe.partition("+")
    config = build_config("LLMRec", args.dataset, config_dict={"show_progress": False, "max_train_samples":
                                                               3 * args.samples, **overrides(args),
                                                               "train_attention": kernel,
                                                               "train_compile": compiled == "compile"})
    _, train, _, _ = prepare(config)
    model = LLMRec(config, train._dataset)
    samples, n = model.samples, args.samples
    learner = LoraLearner(model.llm, model.settings, len(samples))

    def timed(epoch):
        tokens, start = learner.tokens, time.perf_counter()
        learner.epoch(samples[epoch * n:(epoch + 1) * n], model.builder, model.domains, epoch=epoch)
        return time.perf_counter() - start, learner.tokens - tokens

    warm_s, warm_tokens = timed(0)  # compiling happens here
    seconds, tokens = timed(1)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # before the profiler's own records
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed(2)
    by_group, by_op = defaultdict(float), {}
    for e in prof.key_averages():
        by_group[group_of(e.key)] += e.self_cpu_time_total
        by_op[e.key] = e.self_cpu_time_total
    total = sum(by_group.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:8]
    s_user, diff = scoring(model, kernel, args.score_users)
    print("PROBE " + json.dumps({"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
                                 "warm_s": warm_s, "warm_extra_s": warm_s - warm_tokens * seconds / tokens,
                                 "groups": {g: v / total for g, v in by_group.items()},
                                 "top": [(k, v / total) for k, v in top], "s_user": s_user, "score_diff": diff,
                                 "rss_gb": rss_gb}),
          flush=True)


def scoring(model, kernel, n_users):
    """s/user of fp32 scoring (30 candidates, adapter folded) with ``kernel``, and the largest score difference
    from sdpa on the same folded model (training kernels leave slightly different bf16-trained adapters)."""
    from recbole_weaverec.model.llm.scoring import score_candidates
    from recbole_weaverec.model.llm.train_modes import _set_attention

    model.fold()
    titles = model.target.titles
    users = [(model.builder.prompt_ids([titles[i] for i in s.history], [titles[i] for i in s.candidates]),
              [model.builder.answer_ids(titles[c]) for c in s.candidates]) for s in model.samples[:n_users + 1]]
    out = {}
    for name in dict.fromkeys(["sdpa", kernel]):
        _set_attention(model.llm, name)
        score_candidates(model.llm, *users[0])  # warm-up
        start = time.perf_counter()
        scores = [score_candidates(model.llm, p, a).float() for p, a in users[1:]]
        out[name] = ((time.perf_counter() - start) / max(1, len(users) - 1), scores)
    diff = max((float((a - b).abs().max()) for a, b in zip(out[kernel][1], out["sdpa"][1])), default=0.0)
    return out[kernel][0], diff


def main():
    args = parse()
    if args.probe:
        return probe(args)
    from benchmarks.results import write_section

    results = {}
    for kernel in [k for k in args.attention.split(",") if k]:
        cmd = [sys.executable, __file__, "--probe", kernel, "--dataset", args.dataset, "--samples", str(args.samples),
               "--score-users", str(args.score_users), *[x for e in args.set for x in ("--set", e)]]
        with tempfile.TemporaryDirectory() as cache:  # a cold compile each time: the warm-up shows its real cost
            out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                 env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
        line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("PROBE ")), None)
        if line is None:
            sys.exit(f"attention {kernel!r} failed: {out.stderr.strip().splitlines()[-1:]}")
        results[kernel] = json.loads(line[6:])
        print(kernel, f"{results[kernel]['tok_s']:.0f} tok/s", flush=True)
    kernels = list(results)
    ref = results[kernels[0]]
    lines = ["| training variant | training: non-pad tokens/s | × first | warm-up epoch s (of it beyond the timed "
             "speed) | peak RSS | scoring (fp32): s/user | × first | max \\|Δ score\\| vs sdpa (same model) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {r['tok_s']:.0f} | {r['tok_s'] / ref['tok_s']:.2f} | {r['warm_s']:.0f} "
              f"({r['warm_extra_s']:+.0f}) | {r['rss_gb']:.2f} GB | {r['s_user']:.2f} | "
              f"{ref['s_user'] / r['s_user']:.2f} | {r['score_diff']:.1e} |"
              for k, r in results.items()]
    groups = sorted({g for r in results.values() for g in r["groups"]}, key=lambda g: -results[kernels[0]]["groups"]
                    .get(g, 0.0))
    lines += ["", "| share of self CPU time | " + " | ".join(kernels) + " |", "|---|" + "---|" * len(kernels)]
    lines += [f"| {g} | " + " | ".join(f"{r['groups'].get(g, 0.0):.0%}" for r in results.values()) + " |"
              for g in groups]
    lines += [""] + [f"- Top operators ({k}): " + ", ".join(f"`{op}` {v:.0%}" for op, v in r["top"]) + "."
                     for k, r in results.items()]
    body = "\n".join(lines) + f"""

- Training: one process per variant: a warm-up epoch of {args.samples} LLMRec training prompts of `{args.dataset}`
  (timed: it holds the compiling, from an empty inductor cache; in brackets its seconds beyond the timed speed), then a timed epoch of
  {args.samples} others (tokens/s) and a profiled epoch of {args.samples} more (the shares); `+compile` =
  `train_compile: True` (each decoder layer through torch.compile, dynamic shapes); peak RSS of the process
  after the timed epoch (compile workers and the profiler's records not counted); scoring: {args.score_users} users of those prompts (30 candidates, the
  adapter folded, fp32, `score_candidates`, never compiled) after one warm-up user; the LLMRec defaults{' with ' + ', '.join(args.set) if args.set else ''}
  (bf16 autocast, gradient checkpointing, LoRA r=16 on all linear layers). Shares: torch.profiler's self CPU time per operator (the
  profiler's own overhead lowers tokens/s a little; compare rows, not with other sections).
- Load average before the run: {os.getloadavg()[0]:.1f} (2 cores).
"""
    command = f"python benchmarks/llm_profile.py --dataset {args.dataset} --samples {args.samples} " \
              f"--attention {args.attention}" + "".join(f" --set {e}" for e in args.set)
    write_section("LLM training profile (issue 14.2)", body, command=command)
    print(body)


if __name__ == "__main__":
    main()
