"""Data-parallel speed: samples/s with 1 vs N processes (gloo on CPU, nccl on GPU) for the two LLM workloads.

- LoRA training: the LLM learner (LoraLearner.epoch) on the embedded SmolLM2-135M, the same global batches for every
  process count; each process takes a disjoint shard of every global batch and LoRA gradients are all-reduced
  before each optimizer step (recbole_weaverec/distributed.py).
- Candidate scoring (what sharded evaluation does): each process scores its shard of the users (30 candidates each,
  KV-cache scoring), the scores are gathered to rank 0.

Processes are started with torch.multiprocessing like RecBole's run(nproc=N); on CPU each of N processes gets
cores/N threads (as ``--nproc`` runs do).

    python benchmarks/distributed.py --procs 1 2 --train_samples 16 --users 8
"""
import argparse
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import recbole_weaverec  # noqa: E402,F401


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, args, out):
    import torch.distributed as dist

    from recbole_weaverec import distributed
    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.model.llm.scoring import score_candidates
    from recbole_weaverec.model.llm.training import LoraLearner
    from recbole_weaverec.quick_start import build_config, prepare

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    try:
        config = build_config("LLMRec", args.dataset, config_dict={
            "show_progress": False, "max_train_samples": args.train_samples, "train_batch_size": args.batch_size,
            "gradient_accumulation_steps": 1, "gpu_id": str(rank) if cuda else ""})
        _, train_data, _, _ = prepare(config)
        model = LLMRec(config, train_data._dataset)
        samples = model.samples[:args.train_samples]
        learner = LoraLearner(model.llm, model.settings, len(samples))
        learner.epoch(samples[:args.batch_size], model.builder, model.domains, epoch=99)  # warm-up (one step)
        distributed.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        learner.epoch(samples, model.builder, model.domains, epoch=0)
        train_cpu = distributed.all_reduce_sum(time.process_time() - cpu)  # CPU seconds of all processes
        distributed.barrier()
        train_s = time.perf_counter() - start

        model.fold()
        titles = model.target.titles
        users = model.samples[:args.users]
        distributed.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        scores = []
        for s in distributed.shard(users):
            listed = list(s.candidates)
            prompt = model.builder.prompt_ids([titles[i] for i in s.history], [titles[i] for i in listed])
            answers = [model.builder.answer_ids(titles[c]) for c in listed]
            scores.append(score_candidates(model.llm, prompt, answers, pad_id=model.tokenizer.pad_token_id))
        gathered = [None] * distributed.world_size()
        if world > 1:
            dist.all_gather_object(gathered, scores)
        else:
            gathered = [scores]
        score_s = time.perf_counter() - start
        score_cpu = distributed.all_reduce_sum(time.process_time() - cpu)
        if rank == 0:
            torch.save({"train_s": train_s, "score_s": score_s, "train_cpu": train_cpu, "score_cpu": score_cpu, "train_samples": len(samples),
                        "users": sum(len(g) for g in gathered), "tokens": learner.tokens,
                        "threads": torch.get_num_threads(), "load": os.getloadavg()[0]}, out)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def measure(world, args, folder):
    import torch.multiprocessing as mp

    out = str(Path(folder) / f"procs{world}.pt")
    if world == 1:
        worker(0, 1, None, args, out)
    else:
        mp.spawn(worker, args=(world, free_port(), args, out), nprocs=world, join=True)
    return torch.load(out)


def main():
    import tempfile

    from benchmarks.results import write_section

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dataset", default="toys-sample")
    p.add_argument("--train_samples", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=4, help="global batch (split across the processes)")
    p.add_argument("--users", type=int, default=8)
    args = p.parse_args()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as folder:
        for world in args.procs:
            r = measure(world, args, folder)
            train, score = r["train_samples"] / r["train_s"], r["users"] / r["score_s"]
            base = base or (train, score)
            rows.append(f"| {world} | {r['threads']} | {train:.3f} | {train / base[0]:.2f}x | "
                        f"{r['train_cpu'] / r['train_samples']:.1f} | {score:.3f} | {score / base[1]:.2f}x | "
                        f"{r['score_cpu'] / r['users']:.1f} | {r['load']:.1f} |")
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    body = "\n".join([
        "| processes | threads each | LoRA training samples/s | speed-up | CPU s/sample (all processes) | "
        "scoring users/s | speed-up | CPU s/user (all processes) | load avg |",
        "|---|---|---|---|---|---|---|---|---|", *rows]) + f"""

- Device: {device}; backend {'nccl' if torch.cuda.is_available() else 'gloo'}. Embedded SmolLM2-135M-Instruct, fp32,
  LoRA r=16 on all linear layers (LLMRec defaults), prompts of `{args.dataset}` with 30 listed candidates.
- Training: {args.train_samples} samples in global batches of {args.batch_size} (the same batches and, to tolerance,
  the same LoRA weights for every process count; tests/test_distributed.py checks that), one warm-up step first.
  Scoring: {args.users} users x 30 candidates, sharded over the processes, scores gathered to rank 0.
- On this 2-core CPU, N processes split the same 2 cores (cores/N threads each), so data parallelism cannot add
  compute: expect about 1x, minus the gradient all-reduce and duplicated Python work. The point of the mechanism is
  several GPUs or machines (docs/scaling.md); this only shows it runs and what it costs here. The machine is
  shared with other jobs (load average column, on 2 cores): wall-clock samples/s then mostly measure the share of the
  CPU the job got (N processes get a bigger share of a contended machine), so read the CPU-seconds columns: they
  show what data parallelism costs in total work here (all-reduce, duplicated tokenisation and Python).
"""
    write_section("Distributed: 1 vs N processes", body)
    print(body)


if __name__ == "__main__":
    main()
