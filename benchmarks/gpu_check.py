"""GPU readiness check (issue 16.6): peak memory and throughput of the three heavy steps on randomly initialised
models of real shapes, with the package's own code paths.

    python benchmarks/gpu_check.py --shape 7b --out gpu_7b.json          # on a GPU (default device: cuda if any)
    python benchmarks/gpu_check.py --shape tiny --device cpu --out tiny.json

Steps: (a) LoRA training (r=16 on all linear layers, gradient checkpointing, bf16 autocast) at one micro-batch of
the longest allowed prompt; (b) merge + fold of three adapters with ``merging.streaming`` (one layer at a time);
(c) scoring 64 users x 30 candidates with ``model.llm.scoring`` at each ``--score-batch`` (users per forward).
Weights are random and token ids random: only shapes matter for memory and speed. No hub, no dataset, so a
lent GPU spends its minutes on the steps. A failing step (e.g. out of memory) becomes a row of the table and the
remaining steps still run.
"""
import argparse
import gc
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# transformers.Qwen2Config values from the public config.json of Qwen/Qwen2-0.5B and Qwen/Qwen2-7B(-Instruct)
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
COMMON = dict(rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768, use_sliding_window=False,
              hidden_act="silu")
# the tiny shape runs on 2 CPU cores in seconds; the real shapes take the reference's sequence cap (1,200 tokens)
DEFAULT_PROMPT = {"tiny": 96, "0.5b": 1200, "7b": 1200}


def build_model(shape, device, dtype):
    """A randomly initialised Qwen2ForCausalLM created directly on ``device`` in ``dtype`` (a 7B model made on
    the CPU in fp32 would take 30 GB of host memory and minutes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recbole_weaverec.model.llm.backbone import set_base_name

    config = Qwen2Config(**SHAPES[shape], **COMMON)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    set_base_name(model, f"random-qwen2-{shape}")
    return model.eval().requires_grad_(False)


class Meter:
    """Seconds and peak memory of one step: torch.cuda.max_memory_allocated on CUDA (reset per step); on CPU the
    process's peak RSS so far (getrusage cannot be reset, so it never falls between steps)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        self.at_start = torch.cuda.memory_allocated() / 2 ** 30 if self.cuda else None
        self.t0 = time.perf_counter()

    def stop(self):
        self.sync()
        seconds = time.perf_counter() - self.t0
        if self.cuda:
            peak = torch.cuda.max_memory_allocated() / 2 ** 30
            return {"seconds": seconds, "peak_gib": peak, "above_start_gib": peak - self.at_start}
        return {"seconds": seconds, "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                "above_start_gib": None}


def run_step(name, meter, fn, rows):
    """``fn()`` -> dict of figures, measured; an exception (out of memory included) becomes the row's status."""
    meter.start()
    try:
        figures, status = fn() or {}, "ok"
    except Exception as e:  # noqa: BLE001 - every failure is a result here, the next steps still run
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
        figures, status = {}, "out of memory" if oom else f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    row = {"step": name, "status": status, **meter.stop(), **figures}
    rows.append(row)
    print(f"  {name}: {status} ({row['seconds']:.1f} s)", flush=True)
    gc.collect()  # the failed step's tensors (held by its traceback until here) go before the next step
    if meter.cuda:
        torch.cuda.empty_cache()
    return row


def train_step(peft_model, args, device, vocab):
    """``--train-steps`` optimizer steps on one micro-batch (the first warms up kernels; the throughput is the
    last step's), as ``LoraLearner.epoch`` runs them: left-padded batch, answer-only loss, bf16 frozen weights."""
    from recbole_weaverec.model.llm.prompts import IGNORE_INDEX
    from recbole_weaverec.model.llm.samples import collate
    from recbole_weaverec.model.llm.training import answer_loss, autocast, checkpointing, frozen_weights_as

    g = torch.Generator().manual_seed(1)
    answer = args.title_tokens + 1
    encoded = []
    for _ in range(args.micro_batch):
        ids = torch.randint(1, vocab, (args.prompt_tokens + answer,), generator=g).tolist()
        encoded.append((ids, [IGNORE_INDEX] * args.prompt_tokens + ids[-answer:]))
    batch = {k: v.to(device) for k, v in collate(encoded, pad_id=0).items()}
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, meter = [], Meter(device)
    peft_model.train()
    try:
        with frozen_weights_as(peft_model, torch.bfloat16), checkpointing(peft_model, True):
            for _ in range(args.train_steps):
                meter.sync()
                t0 = time.perf_counter()
                with autocast(device, True):
                    loss = answer_loss(peft_model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                meter.sync()
                times.append(time.perf_counter() - t0)
    finally:
        peft_model.eval()
        optimizer.zero_grad(set_to_none=True)
    tokens = int(batch["attention_mask"].sum())
    return {"tokens_per_step": tokens, "tokens_per_s": tokens / times[-1], "loss": float(loss.detach()),
            "throughput": f"{tokens / times[-1]:,.0f} tokens/s"}


def random_adapters(peft_model, n=3):
    """``n`` LoRA adapters of the model's LoRA shapes with random factors (a fresh LoRA's B is zero, which would
    make the merge trivial), as (state_dict, LoraConfig) pairs that ``merging.lora_deltas`` reads."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model)
    config = peft_model.peft_config["default"]
    out = []
    for k in range(n):
        torch.manual_seed(100 + k)
        out.append(({key: torch.randn_like(v) * 0.01 for key, v in state.items()}, config))
    return out


def merge_step(base, adapters, args):
    """What LLMMerge.prepare does: factors only (``lazy=True``), merged and folded one weight at a time."""
    from recbole_weaverec.merging import lora_deltas
    from recbole_weaverec.merging.streaming import MergedDeltas, fold_merged

    deltas = [lora_deltas(a, base_model=base, lazy=True) for a in adapters]
    merged = MergedDeltas(deltas, [1.0] * len(deltas), args.merge_method, density=0.2, seed=0)
    fold_merged(base, merged)
    return {"throughput": f"{len(merged)} weights folded ({args.merge_method})"}


def scoring_users(args, vocab):
    """``--users`` users: prompts of 75-100% of ``--prompt-tokens`` (so batches pad) and ``--candidates`` answers
    of 3..title_tokens tokens + an end token."""
    g = torch.Generator().manual_seed(2)
    users = []
    for _ in range(args.users):
        n = int(torch.randint(max(1, args.prompt_tokens * 3 // 4), args.prompt_tokens + 1, (1,), generator=g))
        prompt = torch.randint(1, vocab, (n,), generator=g).tolist()
        answers = [torch.randint(1, vocab, (int(torch.randint(3, args.title_tokens + 1, (1,), generator=g)),),
                                 generator=g).tolist() + [2] for _ in range(args.candidates)]
        users.append((prompt, answers))
    return users


def score_step(model, users, per_batch, reference, chunk_size):
    """Every user scored ``per_batch`` users per forward (1: ``score_candidates``, the default path); seconds
    per 1000 users, and agreement with the one-user-at-a-time scores when those exist."""
    from recbole_weaverec.model.llm.scoring import score_candidates, score_users

    model.eval()
    if per_batch == 1:
        score_candidates(model, *users[0], chunk_size=chunk_size)  # warm-up: first kernels, allocator
        t0 = time.perf_counter()
        scores = [score_candidates(model, p, a, chunk_size=chunk_size) for p, a in users]
    else:
        score_users(model, users[:per_batch], chunk_size=chunk_size)
        t0 = time.perf_counter()
        scores = []
        for i in range(0, len(users), per_batch):
            scores += score_users(model, users[i:i + per_batch], chunk_size=chunk_size)
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"users": len(users), "s_per_1000_users": seconds / len(users) * 1000,
           "throughput": f"{seconds / len(users) * 1000:.1f} s / 1000 users", "_scores": scores}
    if reference is not None:
        out["max_abs_diff_vs_b1"] = max(float((s - r).abs().max()) for s, r in zip(scores, reference))
        out["same_ranking_share"] = sum(torch.equal(s.argsort(descending=True), r.argsort(descending=True))
                                        for s, r in zip(scores, reference)) / len(users)
    return out


def table(rows):
    lines = ["| step | status | seconds | peak memory (GiB) | above step start (GiB) | throughput |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        above = "—" if r.get("above_start_gib") is None else f"{r['above_start_gib']:.2f}"
        extra = r.get("throughput", "—")
        if "max_abs_diff_vs_b1" in r:
            extra += f" (max \\|Δ\\| vs B=1 {r['max_abs_diff_vs_b1']:.1e}, same ranking {r['same_ranking_share']:.0%})"
        lines.append(f"| {r['step']} | {r['status']} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {above} | "
                     f"{extra} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="longest prompt (default: by shape)")
    parser.add_argument("--title-tokens", type=int, default=16, help="longest answer title")
    parser.add_argument("--micro-batch", type=int, default=4, help="prompts per training pass")
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--merge-method", default="ties")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--score-batch", default="1,8", help="users per scoring forward, comma-separated")
    parser.add_argument("--chunk-size", type=int, default=64, help="score_chunk_size")
    parser.add_argument("--out", required=True, help="JSON file of the figures")
    args = parser.parse_args(argv)
    args.prompt_tokens = args.prompt_tokens or DEFAULT_PROMPT[args.shape]
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not this check's subject
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here (use --device cpu)")
    device = torch.device(args.device)
    # the package's defaults: bf16 weights on CUDA (llm_dtype auto), fp32 on CPU; scores are summed in fp32 either way
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter, rows = Meter(device), []
    result = {"shape": args.shape, "config": {**SHAPES[args.shape], **COMMON}, "device": args.device,
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "dtype": str(dtype), "args": vars(args), "torch": torch.__version__, "steps": rows}
    print(f"gpu_check: Qwen2 {args.shape} shape on {result['device_name']} ({dtype}), prompt {args.prompt_tokens} "
          f"tokens", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    result["build_seconds"] = time.perf_counter() - t0
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["model_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 30
    vocab = model.config.vocab_size

    from recbole_weaverec.model.llm.training import LoraSettings, add_lora

    settings = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear", gradient_checkpointing=True,
                            bf16=True)
    holder = {"model": model}

    def with_lora():  # the LoRA layers and the three adapters are made outside the measured steps
        holder["peft"] = add_lora(model, settings)
        holder["adapters"] = random_adapters(holder["peft"])

    try:
        with_lora()
    except Exception as e:  # noqa: BLE001 - reported as the training and merge rows
        holder["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
    if "error" in holder:
        for step in ("train", "merge + fold"):
            rows.append({"step": step, "status": f"setup failed: {holder['error']}", "seconds": 0.0,
                         "peak_gib": 0.0, "above_start_gib": None})
    else:
        run_step(f"train (LoRA r=16, batch {args.micro_batch} x {args.prompt_tokens + args.title_tokens + 1})",
                 meter, lambda: train_step(holder["peft"], args, device, vocab), rows)
        holder["model"] = holder.pop("peft").unload()  # LoRA layers out; the base weights were never touched
        run_step("merge + fold (3 adapters)", meter, lambda: merge_step(holder["model"], holder["adapters"], args),
                 rows)
    holder.pop("adapters", None)

    users, reference = scoring_users(args, vocab), None
    for per_batch in [int(b) for b in args.score_batch.split(",")]:
        row = run_step(f"score ({args.users} users x {args.candidates}, B={per_batch})", meter,
                       lambda: score_step(holder["model"], users, per_batch, reference, args.chunk_size), rows)
        scores = row.pop("_scores", None)
        if per_batch == 1 and scores is not None:
            reference = scores
    result["total_seconds"] = time.perf_counter() - t0
    print(table(rows), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
