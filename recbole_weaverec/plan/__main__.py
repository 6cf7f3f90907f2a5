"""``python -m recbole_weaverec.plan <the arguments of a run>``: the estimated peak device memory of the run's
training, merging and scoring, from the config alone; with ``--device-memory GIB`` (or a CUDA device's own total)
a plan that cannot fit is refused with one line and exit status 2, so nothing is trained for a run that would fail.
"""
import sys

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.plan.formulas import GIB

CUDA_RESERVE_GIB = 1.0  # the CUDA context and the allocator's fragmentation, which no formula here counts
HINTS = {
    "training": "lower train_tokens_per_pass, train_batch_size or max_prompt_tokens, or set "
                "gradient_checkpointing: True",
    "merge + fold": "merge fewer adapters (source_domains) or use a device with more memory",
    "merge λ fit": "use weave_merge: average or weights, or lower max_prompt_tokens / max_title_tokens",
    "scoring": "lower score_chunk_size, score_users_per_batch or max_prompt_tokens",
}


def build_parser():
    from recbole_weaverec.cli import build_parser as run_parser

    p = run_parser()  # the run's own arguments, parsed the same way
    p.prog = "python -m recbole_weaverec.plan"
    p.description = ("Estimated peak device memory of a run's training, merging and scoring (no weights loaded). "
                     "Takes a run's arguments; extra --key=value arguments override config files.")
    p.add_argument("--device-memory", type=float, default=None, metavar="GIB",
                   help="memory of one device in GiB; a plan that does not fit exits 2 (default: the CUDA "
                        "device's total when the plan is for CUDA and one is present)")
    p.add_argument("--on", choices=("cuda", "cpu"), default=None,
                   help="plan for this device type (default: the run's device)")
    p.add_argument("--llm-config", default=None, metavar="FILE",
                   help="the LM's config.json (or its folder) when llm_path's config is not on this machine")
    p.add_argument("--tflops", type=float, default=None, metavar="R",
                   help="the device's sustained matmul rate in TFLOP/s: scoring time per 1,000 users at that rate")
    p.add_argument("--reserve", type=float, default=None, metavar="GIB",
                   help=f"memory kept free of the estimate (default {CUDA_RESERVE_GIB} GiB on CUDA, 0 on the CPU)")
    return p


def _gib(nbytes):
    return f"{nbytes / GIB:.2f}"


def table(phases):
    """One row per phase: its estimate and its largest terms."""
    width = max(len(p.name) for p in phases)
    lines = [f"{'phase':<{width}}  {'GiB':>7}  main terms (GiB)"]
    for p in phases:
        top = sorted(p.terms, key=lambda t: -t[1])[:4]
        terms = "; ".join(f"{label} {_gib(b)}" for label, b in top)
        lines.append(f"{p.name:<{width}}  {_gib(p.total):>7}  {terms}" + (f"  [{p.note}]" if p.note else ""))
    return "\n".join(lines)


def device_memory(args, cuda):
    if args.device_memory is not None:
        if not args.device_memory > 0:
            raise ConfigError(f"--device-memory={args.device_memory!r} is not allowed: expected GiB > 0")
        return args.device_memory * GIB
    if cuda:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def scoring_compute(config, shape, cuda, world, tflops):
    """The compute lines (``plan.compute``) of a sampled protocol; full ranking's candidate count is the catalogue's,
    which the config alone does not give."""
    from recbole_weaverec.plan.compute import ScoringCompute, describe
    from recbole_weaverec.plan.phases import eval_candidates, specs

    if tflops is not None and not tflops > 0:
        raise ConfigError(f"--tflops={tflops!r} is not allowed: expected a rate in TFLOP/s > 0")
    n, _ = eval_candidates(config)
    if n is None:
        return ["compute: not planned for full ranking (every item of the catalogue is a candidate)"]
    score = specs(config, shape, cuda, world)[3]
    return describe(shape, ScoringCompute(score.prompt, score.answer_inputs, n, score.chunk), tflops)


def check_fit(phases, memory, reserve):
    """ConfigError (one line) naming each phase that does not fit in ``memory`` - ``reserve`` bytes."""
    over = [p for p in phases if p.total + reserve > memory]
    if not over:
        return
    worst = max(over, key=lambda p: p.total)
    big = max(worst.terms, key=lambda t: t[1])
    raise ConfigError(
        f"the plan does not fit in {memory / GIB:.1f} GiB of device memory"
        + (f" ({reserve / GIB:.1f} GiB kept free)" if reserve else "") + ": "
        + ", ".join(f"{p.name} needs ~{_gib(p.total)} GiB" for p in over)
        + f" (largest term: {big[0]} {_gib(big[1])} GiB); {HINTS[worst.name]}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, extra = build_parser().parse_known_args(argv)
    from recbole_weaverec.plan.phases import model_kind, phases as plan_phases
    from recbole_weaverec.plan.shapes import llm_shape
    from recbole_weaverec.quick_start import DEFAULT_MODEL, build_config
    from recbole_weaverec.registry import UnknownModelError

    files = args.config_files.split() if args.config_files else None
    model = args.model
    if model is None and not files and not any(a.startswith("--model=") for a in extra):
        model = DEFAULT_MODEL
    try:
        config = build_config(model, args.dataset, files, cmd_args=extra)
        cuda = args.on == "cuda" if args.on else "cuda" in str(config["device"])
        world = args.world_size if args.world_size > 0 else args.nproc
        model_kind(config)  # another model is refused before its (absent) LM is looked up
        shape, source = llm_shape(config["llm_path"], config["llm_cache_dir"], args.llm_config)
        phases, assumed = plan_phases(config, shape, cuda, world)
        memory = device_memory(args, cuda)
        reserve = (CUDA_RESERVE_GIB if cuda else 0.0) if args.reserve is None else args.reserve
        if reserve < 0:
            raise ConfigError(f"--reserve={reserve!r} is not allowed: expected GiB >= 0")
        print(f"memory plan of {config['model']} on {config['dataset']} for one {'CUDA' if cuda else 'CPU'} device "
              f"(per process: {world} process(es))")
        print(f"LM: {shape.name}: {shape.params() / 1e9:.2f}B parameters, {shape.layers} layers, hidden "
              f"{shape.hidden}, MLP {shape.intermediate}, vocabulary {shape.vocab} (config from {source})")
        for line in assumed:
            print(f"  {line}")
        print(table(phases))
        for line in scoring_compute(config, shape, cuda, world, args.tflops):
            print(line)
        peak = max(phases, key=lambda p: p.total)
        if memory is None:
            print(f"peak: {peak.name} ~{_gib(peak.total)} GiB (no device memory given: --device-memory GIB checks "
                  f"the fit)")
            return 0
        check_fit(phases, memory, reserve * GIB)
        print(f"fits: peak {peak.name} ~{_gib(peak.total)} GiB of {memory / GIB:.1f} GiB")
    except (ConfigError, UnknownModelError, FileNotFoundError) as e:
        sys.stdout.flush()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
