"""Peak memory of merging K LoRA adapters into a model and folding the result, old (dense) path vs the
one-weight-at-a-time path (``merging.streaming``), on a randomly initialised Llama of SmolLM2-135M's shape.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/merge_memory.py --layers 30 --rank 16 --adapters 3

Memory is torch's CPU allocations above the start of each merge (the profiler records every allocator event);
the model and the adapters' LoRA factors are loaded before and not counted.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.results import write_section  # noqa: E402
from recbole_weaverec import merging as M  # noqa: E402
from recbole_weaverec.merging.streaming import FactorMerge, MergedDeltas, fold_merged  # noqa: E402


def peak_mib(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    now = peak = 0
    for _, change in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                            if e.self_cpu_memory_usage):
        now += change
        peak = max(peak, now)
    return peak / 2 ** 20, seconds


def adapters(model, k, rank):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(k):
        state = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen)
                state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen)
        out.append(M.lora_deltas((state, {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}), model, lazy=True))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=1024, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                         num_attention_heads=9, num_key_value_heads=3)
    model = LlamaForCausalLM(config).eval()
    deltas = adapters(model, args.adapters, args.rank)
    paths = {
        "dense: merge_deltas + fold_deltas (old LLMMerge)":
            lambda: M.fold_deltas(model, M.merge_deltas(deltas)),
        "streamed: MergedDeltas + fold_merged": lambda: fold_merged(model, MergedDeltas(deltas)),
        "stacked learned merge: LearnedDeltaMerge (old WeaveRec learned)":
            lambda: M.LearnedDeltaMerge(deltas),
        "factor-form learned merge: FactorMerge": lambda: FactorMerge(deltas),
    }
    layer = 4 * config.hidden_size * config.intermediate_size / 2 ** 20
    load = os.getloadavg()[0]
    lines = [f"Random Llama of SmolLM2-135M's shape, {args.layers} layers, {args.adapters} adapters of rank "
             f"{args.rank}; largest ΔW {layer:.2f} MiB (fp32). Peak = torch's CPU allocations above the start of "
             f"the merge (profiler events; the model and the adapters' factors are loaded before). Load average "
             f"at start {load:.2f}: the times are indicative only, the memory is exact.", "",
             "| path | peak MiB | seconds |", "|---|---|---|"]
    for name, fn in paths.items():
        mib, seconds = peak_mib(fn)
        print(f"{name:<66} peak {mib:9.1f} MiB  {seconds:6.2f} s")
        lines.append(f"| {name} | {mib:.1f} | {seconds:.2f} |")
    if args.write:
        write_section("Merge memory (benchmarks/merge_memory.py)", "\n".join(lines))


if __name__ == "__main__":
    main()
