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
from recbole_weaverec.model.llm.scoring import naive_scores, score_candidates  # noqa: E402


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


def speed(args):
    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.model.llm.training import LoraLearner, collate, encode_sample
    from recbole_weaverec.quick_start import build_config, prepare

    config = build_config("LLMRec", args.speed_dataset, config_dict={"show_progress": False,
                                                                      "llm_path": args.llm_path})
    _, train_data, _, _ = prepare(config)
    model = LLMRec(config, train_data._dataset)
    body, head = linear_params(model.llm)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    samples = model.samples[:args.speed_samples]
    rows = []
    for bf16 in (False, True):
        model.settings.bf16 = bf16
        learner = LoraLearner(model.llm, model.settings, len(samples))
        enc = [encode_sample(s, model.builder, model.domains) for s in samples]
        answers = sum(sum(1 for y in lab if y != -100) + 1 for _, lab in enc)
        start = time.perf_counter()
        learner.epoch(samples, model.builder, model.domains, epoch=0)
        seconds = time.perf_counter() - start
        tokens = learner.tokens
        # frozen base: forward (2 FLOP/param/token) + input gradients (2); the LM head runs on answer positions only
        flops = 4 * body * tokens + 4 * head * answers
        peak = peak16 if bf16 else peak32
        rows.append((f"LoRA training ({'bf16 autocast' if bf16 else 'fp32'}), batch {model.settings.batch_size}",
                     f"{tokens / seconds:.1f} tokens/s", f"{flops / seconds / 1e9:.1f}", f"{peak:.0f}",
                     f"{flops / seconds / 1e9 / peak:.0%}"))
    model.fold()
    users = model.samples[:args.speed_users]
    titles = model.target.titles

    def prompt_and_answers(s):
        listed = list(s.candidates)
        prompt = model.builder.prompt_ids([titles[i] for i in s.history], [titles[i] for i in listed])
        return prompt, [model.builder.answer_ids(titles[c]) for c in listed]

    start = time.perf_counter()
    prompt_tok = cand_tok = 0
    for s in users:
        prompt, answers = prompt_and_answers(s)
        score_candidates(model.llm, prompt, answers, pad_id=model.tokenizer.pad_token_id)
        prompt_tok += len(prompt)
        cand_tok += sum(len(a) for a in answers)
    kv_s = (time.perf_counter() - start) / len(users)
    flops = (2 * body * (prompt_tok + cand_tok) + 2 * head * (len(users) + cand_tok)) / len(users)
    rows.append(("scoring 30 candidates, KV cache (fp32)", f"{1 / kv_s:.3f} users/s ({kv_s:.2f} s/user)",
                 f"{flops / kv_s / 1e9:.1f}", f"{peak32:.0f}", f"{flops / kv_s / 1e9 / peak32:.0%}"))
    naive_users = [prompt_and_answers(s) for s in users[:args.naive_users]]
    start = time.perf_counter()
    slow = [naive_scores(model.llm, prompt, answers) for prompt, answers in naive_users]
    naive_s = (time.perf_counter() - start) / len(naive_users)
    max_diff = max(float((x - score_candidates(model.llm, p, a)).abs().max()) for x, (p, a) in zip(slow, naive_users))
    rows.append(("scoring 30 candidates, 30 separate forwards (fp32)", f"{1 / naive_s:.3f} users/s "
                 f"({naive_s:.2f} s/user)", "", "", ""))
    table = ["| what | speed | achieved GFLOP/s | matmul peak GFLOP/s | achieved/bound |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    body_md = "\n".join(table) + f"""

- Model: {model.base_name} ({body / 1e6:.1f}M decoder Linear + {head / 1e6:.1f}M LM-head parameters),
  LoRA r={model.settings.r} on all linear layers; prompts from `{args.speed_dataset}` with the default settings
  (max_history={config['max_history']}, max_title_tokens={config['max_title_tokens']}, 30 candidates listed;
  mean prompt {prompt_tok / len(users):.0f} tokens, mean answer {cand_tok / len(users) / 30:.1f} tokens).
- Training: {len(samples)} samples; FLOPs counted as 4 x Linear params per token (forward + input gradients of the
  frozen base; LoRA's own work is < 4% extra and not counted) + the LM head on answer positions only. Peak = best
  2048^3 matmul in the same run.
- KV-cache scoring vs 30 separate forwards: **{naive_s / kv_s:.1f}x** faster on {args.naive_users} users
  (max |score difference| {max_diff:.1e}); KV timing over {len(users)} users.
- Load average while measuring (shared 2-core machine): {os.getloadavg()[0]:.1f}.
"""
    write_section("LLM core: speed", body_md)
    print(body_md, flush=True)


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

    defaults = yaml.safe_load((REPO / "recbole_weaverec" / "properties" / "model" / "LLMRec.yaml").read_text())
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
  **{args.train_samples} training prompts per domain** (paper: 30,000 and 2 epochs on Qwen2-7B).
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
    parser.add_argument("--speed-samples", type=int, default=8)
    parser.add_argument("--speed-users", type=int, default=4)
    parser.add_argument("--naive-users", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--models", default=None, help="comma-separated row labels (prefixes) to run; default all")
    parser.add_argument("--section", default="LLM core: quality at CPU scale", help="RESULTS.md section to write")
    parser.add_argument("--llm-path", default="embedded", help="another model only for dry runs of this script")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    if not args.skip_speed:
        speed(args)
    if not args.skip_quality:
        quality(args)


if __name__ == "__main__":
    main()
