"""LLM core benchmark (issue "LLM recommender core"): speed against the FLOP bound, KV-cache scoring against
separate forwards, and quality at CPU scale (LLMRec, LLMJoint, LLMMerge x3, SASRec, EASE on identical uni29 users
and candidates). Writes two sections of benchmarks/RESULTS.md.

    nohup nice -n 10 python benchmarks/llm.py > /work/logs/bench_llm.log 2>&1 &

Options: --train-samples (per domain), --eval-users, --skip-speed, --skip-quality, --target/--source.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.results import write_section  # noqa: E402
from recbole_weaverec import compat  # noqa: E402,F401


def matmul_peak(dtype, n=2048, reps=6):
    """Best GFLOP/s of an n x n x n matmul (the machine's practical bound for dense LM work)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def linear_params(model):
    """(parameters of the decoder's Linear layers, parameters of the LM head)."""
    head = model.get_output_embeddings().weight.numel()
    body = sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n and "lora_" not in n)
    return body, head


@torch.inference_mode()
def old_scores(model, prompt_ids, answers, pad_id):
    """The scoring path before issue 14: the prompt's KV cache copied once per candidate, right-padded answers."""
    import copy

    from transformers import DynamicCache

    prompt = torch.tensor([list(prompt_ids)])
    out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    cache, n = copy.deepcopy(out.past_key_values), prompt.shape[1]
    lengths = torch.tensor([len(a) for a in answers])
    ids = torch.full((len(answers), int(lengths.max())), pad_id)
    for i, a in enumerate(answers):
        ids[i, :len(a)] = torch.tensor(a)
    cache.batch_repeat_interleave(len(answers))
    inputs = ids[:, :-1]
    positions = torch.arange(n, n + inputs.shape[1]).expand_as(inputs)
    logits = model(input_ids=inputs, past_key_values=cache, position_ids=positions, use_cache=True).logits
    token_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = torch.arange(1, ids.shape[1])[None, :] < lengths[:, None]
    return (first[ids[:, 0]] + (token_logp * mask).sum(1)) / lengths


TRAIN_VARIANTS = [  # (label, config overrides): each measured in its own process (peak RSS is per process)
    ("fp32, LoRA dropout 0.05, whole batch per pass (the old default)",
     {"train_bf16": False, "lora_dropout": 0.05, "train_tokens_per_pass": None, "train_length_buckets": 0,
      "gradient_checkpointing": False}),
    ("bf16-held frozen weights + autocast, dropout 0.05",
     {"lora_dropout": 0.05, "train_tokens_per_pass": None, "train_length_buckets": 0, "gradient_checkpointing": False}),
    ("bf16, dropout 0, whole batch, no buckets",
     {"train_tokens_per_pass": None, "train_length_buckets": 0, "gradient_checkpointing": False}),
    ("bf16, dropout 0, 1024 tokens/pass, buckets of 8", {"gradient_checkpointing": False}),
    ("the same + gradient checkpointing (the default)", {"gradient_checkpointing": True}),
    ("gradient checkpointing, 2048 tokens/pass", {"gradient_checkpointing": True, "train_tokens_per_pass": 2048}),
    ("gradient checkpointing, whole batch (batch 8)", {"gradient_checkpointing": True, "train_tokens_per_pass": None,
                                                       "train_batch_size": 8}),
    ("the default + eager attention (train_attention)", {"gradient_checkpointing": True, "train_attention": "eager"}),
    ("eager attention, no checkpointing, 1024 tokens/pass", {"gradient_checkpointing": False,
                                                              "train_attention": "eager"}),
    ("eager + compiled layers (train_compile: True; the default from 128 prompts; its time holds the compiling)",
     {"gradient_checkpointing": True, "train_attention": "eager", "train_compile": True}),
]
for _label, _overrides in TRAIN_VARIANTS:  # rows measured before eager/compile became defaults keep their meaning
    _overrides.setdefault("train_attention", None)
    _overrides.setdefault("train_compile", False)
SCORE_VARIANTS = [("old path: cache copied per candidate (fp32)", "old", {}),
                  ("packed answers, one uncopied cache (fp32, the default)", "new", {}),
                  ("packed answers (llm_dtype: bfloat16)", "new", {"llm_dtype": "bfloat16"}),
                  ("packed answers, 4 users per forward (score_users_per_batch: 4, fp32)", "users4", {})]


def _model(args, overrides):
    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.quick_start import build_config, prepare

    config = build_config("LLMRec", args.speed_dataset, config_dict={
        "show_progress": False, "llm_path": args.llm_path, "max_train_samples": args.speed_samples, **overrides})
    _, train_data, _, _ = prepare(config)
    return LLMRec(config, train_data._dataset)


def _peak_gb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def train_probe(args, overrides):
    """One training variant in this process: non-pad tokens/s, padded share, peak RSS, FLOP rate."""
    from recbole_weaverec.model.llm.training import LoraLearner

    model = _model(args, overrides)
    body, head = linear_params(model.llm)
    learner = LoraLearner(model.llm, model.settings, len(model.samples))
    start = time.perf_counter()
    learner.epoch(model.samples, model.builder, model.domains, epoch=0)
    seconds = time.perf_counter() - start
    answers = sum(sum(1 for y in lab if y != -100) for _, lab in learner._encoded.values())
    flops = 4 * body * learner.tokens + 4 * head * answers  # frozen base: forward + input gradients
    return {"tok_s": learner.tokens / seconds, "gflops": flops / seconds / 1e9, "peak_gb": _peak_gb(),
            "bf16": model.settings.bf16, "prompt_tokens": learner.tokens / len(model.samples)}


def score_probe(args, path, overrides):
    """One scoring variant: s/user over ``speed_users`` users (30 candidates), peak RSS, the scores. ``path``: old,
    new (one user per forward) or usersN (N users per forward, ``score_users``)."""
    from recbole_weaverec.model.llm.scoring import score_candidates, score_users

    model = _model(args, {"max_train_samples": args.speed_users, **overrides})
    model.fold()
    users = [_prompt_and_answers(model, s) for s in model.samples]
    body, head = linear_params(model.llm)
    if path.startswith("users"):
        per = int(path[len("users"):])

        def score_all(us):
            return [s for i in range(0, len(us), per) for s in score_users(model.llm, us[i:i + per])]
    else:
        score = (lambda p, a: old_scores(model.llm, p, a, model.tokenizer.pad_token_id)) if path == "old" else \
            (lambda p, a: score_candidates(model.llm, p, a))

        def score_all(us):
            return [score(p, a) for p, a in us]
    score_all(users[:1])  # warm-up
    start = time.perf_counter()
    scores = [s.float().tolist() for s in score_all(users)]
    seconds = (time.perf_counter() - start) / len(users)
    tokens = sum(len(p) + sum(len(a) for a in ans) for p, ans in users) / len(users)
    answer_tokens = sum(sum(len(a) for a in ans) for _, ans in users) / len(users)
    flops = 2 * body * tokens + 2 * head * answer_tokens
    return {"s_user": seconds, "gflops": flops / seconds / 1e9, "peak_gb": _peak_gb(), "scores": scores,
            "bf16": overrides.get("llm_dtype") == "bfloat16", "prompt_tokens": tokens - answer_tokens}


def naive_probe(args, n_users):
    from recbole_weaverec.testing import naive_scores

    model = _model(args, {"max_train_samples": args.speed_users})
    model.fold()
    return {"scores": [naive_scores(model.llm, *_prompt_and_answers(model, s)).tolist()
                       for s in model.samples[:n_users]]}


def _prompt_and_answers(model, s):
    titles = model.target.titles
    listed = list(s.candidates)
    prompt = model.builder.prompt_ids([titles[i] for i in s.history], [titles[i] for i in listed])
    return prompt, [model.builder.answer_ids(titles[c]) for c in listed]


def _in_subprocess(args, probe, spec):
    import subprocess

    cmd = [sys.executable, __file__, "--probe", json.dumps([probe, spec]), "--speed-dataset", args.speed_dataset,
           "--speed-samples", str(args.speed_samples), "--speed-users", str(args.speed_users),
           "--llm-path", args.llm_path]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((x for x in reversed(out.stdout.splitlines()) if x.startswith("PROBE ")), None)
    if line is None:
        raise RuntimeError(f"probe {probe} {spec} failed: {out.stderr[-2000:]}")
    return json.loads(line[6:])


def run_probe(args):
    probe, spec = json.loads(args.probe)
    if probe == "train":
        out = train_probe(args, spec)
    elif probe == "score":
        out = score_probe(args, spec[0], spec[1])
    else:
        out = naive_probe(args, spec)
    print("PROBE " + json.dumps(out), flush=True)


def agreement(fast, reference):
    """(max |score difference|, share of users whose whole candidate ranking is identical)."""
    diffs, same = 0.0, 0
    for f, r in zip(fast, reference):
        f, r = torch.tensor(f), torch.tensor(r)
        diffs = max(diffs, float((f - r).abs().max()))
        same += bool(torch.equal(torch.argsort(f, descending=True), torch.argsort(r, descending=True)))
    return diffs, same / len(reference)


def speed(args):
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    load = os.getloadavg()[0]
    lines = ["| training variant | non-pad tokens/s | × old | achieved GFLOP/s | of matmul peak | peak RSS |",
             "|---|---|---|---|---|---|"]
    old = None
    for label, overrides in TRAIN_VARIANTS:
        r = _in_subprocess(args, "train", overrides)
        old = old or r["tok_s"]
        peak = peak16 if r["bf16"] else peak32
        lines.append(f"| {label} | {r['tok_s']:.0f} | {r['tok_s'] / old:.2f} | {r['gflops']:.0f} | "
                     f"{r['gflops'] / peak:.0%} | {r['peak_gb']:.2f} GB |")
        print(lines[-1], flush=True)
    reference = _in_subprocess(args, "naive", args.naive_users)["scores"]
    lines += ["", "| scoring variant (30 candidates per user) | s/user | × old | achieved GFLOP/s | of matmul peak | "
              "peak RSS | max \\|Δ score\\| vs fp32 reference | identical rankings |", "|---|---|---|---|---|---|---|---|"]
    old = None
    for label, path, overrides in SCORE_VARIANTS:
        r = _in_subprocess(args, "score", [path, overrides])
        old = old or r["s_user"]
        diff, same = agreement(r["scores"][:len(reference)], reference)
        peak = peak16 if r["bf16"] else peak32
        lines.append(f"| {label} | {r['s_user']:.2f} | {old / r['s_user']:.2f} | {r['gflops']:.0f} | "
                     f"{r['gflops'] / peak:.0%} | {r['peak_gb']:.2f} GB | {diff:.1e} | {same:.0%} |")
        print(lines[-1], flush=True)
    body = "\n".join(lines) + f"""

- Model: the embedded SmolLM2-135M-Instruct, LoRA r=16 on all linear layers, prompts of `{args.speed_dataset}` with
  the 30 candidates listed (max_history 5, titles <= 10 tokens; ~{r['prompt_tokens']:.0f} prompt tokens).
- Training: {args.speed_samples} prompts, batch 4 unless stated, one process per row (peak RSS = the whole process:
  libraries, dataset, fp32 weights, bf16 copies, activations). FLOPs: 4 x Linear parameters per non-pad token
  (forward + input gradients of the frozen base) + the LM head on answer tokens; LoRA's own work is not counted.
- Scoring: {args.speed_users} users per row, adapter folded; the reference is one fp32 forward pass per candidate
  (`naive_scores`) on {args.naive_users} users. FLOPs: 2 x Linear parameters per prompt and answer token + the LM
  head on answer tokens.
- Matmul peaks measured in this run (best 2048^3): fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s.
- Load average before the run: {load:.1f} (2 cores; one job at a time).
"""
    write_section("LLM core: speed", body)
    print(body, flush=True)


METRICS = ["ndcg@1", "ndcg@3", "ndcg@5", "mrr@5", "hit@1", "hit@5"]


def quality(args):
    from recbole_weaverec.quick_start import run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_llm_"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    adapters = work / "adapters"
    common = {"data_path": str(args.data_path), "eval_mode": "uni29", "metrics": ["NDCG", "MRR", "Hit"],
              "topk": [1, 3, 5], "valid_metric": "NDCG@5", "eval_sample_users": args.eval_users, "seed": 2020,
              "show_progress": False, "checkpoint_dir": str(work / "saved")}
    llm = {"max_train_samples": args.train_samples, "source_domains": [args.source], "llm_path": args.llm_path}
    runs = [
        ("LLMMerge (average)", "LLMMerge", {**llm, "merge_method": "average", "adapter_dir": str(adapters)}),
        ("LLMRec (target-only adapter)", "LLMRec",
         {**llm, "adapter_paths": {args.target: str(adapters / args.target)}}),
        ("LLMMerge (ties, density 0.2)", "LLMMerge", {**llm, "merge_method": "ties", "adapter_dir": str(adapters)}),
        ("LLMMerge (task_arithmetic, λ=0.3)", "LLMMerge",
         {**llm, "merge_method": "task_arithmetic", "adapter_dir": str(adapters)}),
        ("EASE", "EASE", {}),
        ("SASRec", "SASRec", {"epochs": args.sasrec_epochs, "stopping_step": 3, "train_batch_size": 512,
                              "loss_type": "CE", "train_neg_sample_args": None}),
        ("LLMJoint", "LLMJoint", llm),
    ]
    if args.models:  # e.g. --models=LLMJoint to run one row in a second process
        runs = [r for r in runs if any(r[0].startswith(m) for m in args.models.split(","))]
    results = []
    for label, model, extra in runs:
        start = time.time()
        try:
            out = run(model, args.target, config_dict={**common, **extra})
            res = {k: float(v) for k, v in out["test_result"].items()}
        except Exception as e:  # keep the other rows; say what failed
            res = {"error": f"{type(e).__name__}: {e}"}
        res["seconds"] = time.time() - start
        results.append((label, res))
        print(label, json.dumps(res), flush=True)
        write_quality(args, results, work)


def write_quality(args, results, work):
    table = ["| model | " + " | ".join(METRICS) + " | wall time |", "|---" * (len(METRICS) + 2) + "|"]
    for label, res in results:
        if "error" in res:
            table.append(f"| {label} | " + " | ".join("—" for _ in METRICS) + f" | failed: {res['error'][:120]} |")
        else:
            table.append(f"| {label} | " + " | ".join(f"{res.get(m, float('nan')):.4f}" for m in METRICS)
                         + f" | {res['seconds']:.0f} s |")
    import yaml

    defaults = yaml.safe_load((REPO / "recbole_weaverec" / "properties" / "model" / "base" / "llm.yaml").read_text())
    d = {k: defaults[k] for k in ("epochs", "train_batch_size", "learning_rate", "max_history", "max_title_tokens",
                                  "num_prompt_candidates", "lora_r", "lora_alpha")}
    body = "\n".join(table) + f"""

- Target `{args.target}`, source `{args.source}` (shared data). Test split, uni29 (true next item + 29 sampled,
  identical users and candidates for every row): **{args.eval_users} seeded test users** (`eval_sample_users`),
  so one user moves NDCG@5 by up to {1 / args.eval_users:.3f}; differences between rows are within noise at this size.
- LLM rows: `llm_path={args.llm_path}` (embedded = SmolLM2-135M-Instruct), LoRA r={d['lora_r']}/α={d['lora_alpha']}
  on all linear layers, the YAML's CPU defaults ({d['epochs']} epoch(s), batch {d['train_batch_size']},
  lr {d['learning_rate']}, max_history {d['max_history']}, titles ≤ {d['max_title_tokens']} tokens,
  {d['num_prompt_candidates']} candidates in the prompt),
  **{args.train_samples} training prompts per domain** (the reference: Qwen2-7B, 2 epochs, on other data: one validation-item prompt per user + 30,000 earlier prefixes per domain).
  The per-domain adapters are trained once (in the first LLMMerge run, `adapter_dir`) and reused by the other
  LLMMerge rows; "LLMRec" evaluates that target-only adapter (`adapter_paths`). LLMJoint trains one adapter on
  {args.train_samples} + {args.train_samples} shuffled prompts.
- SASRec: RecBole's, CE loss, ≤ {args.sasrec_epochs} epochs; EASE: this package's (λ=250, popularity tie-break).
- Wall time includes loading the datasets and the model; the machine is shared with other jobs
  (load average now {os.getloadavg()[0]:.1f}). Run folder: `{work}`.
"""
    write_section(args.section, body)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-path", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--target", default="amazon-toys")
    parser.add_argument("--source", default="amazon-beauty")
    parser.add_argument("--train-samples", type=int, default=32)
    parser.add_argument("--eval-users", type=int, default=20)
    parser.add_argument("--sasrec-epochs", type=int, default=10)
    parser.add_argument("--speed-dataset", default="toys-sample")
    parser.add_argument("--speed-samples", type=int, default=48)
    parser.add_argument("--speed-users", type=int, default=10)
    parser.add_argument("--naive-users", type=int, default=10)
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--models", default=None, help="comma-separated row labels (prefixes) to run; default all")
    parser.add_argument("--section", default="LLM core: quality at CPU scale", help="RESULTS.md section to write")
    parser.add_argument("--llm-path", default="embedded", help="another model only for dry runs of this script")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if args.probe:
        return run_probe(args)
    if not args.skip_speed:
        speed(args)
    if not args.skip_quality:
        quality(args)


if __name__ == "__main__":
    main()
