"""Memory planner (issue 16.5): the planner's estimates against the real peak memory of the package's own code paths
(``LoraLearner``, ``merging.streaming``, ``model.llm.scoring``) on tiny randomly initialised Llama and Qwen2 models on
the CPU, and its command: a table for a run's arguments, and a plan that cannot fit refused with one line, exit 2.

Stated factors: the whole estimate (weights included, which are counted exactly) must be within TOTAL of the
measured peak, and the part above the weights (activations, caches, ΔW, logits: what the formulas model) within
ABOVE of the measured peak above the weights. Run with -s to see the measured-vs-estimated table.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from recbole_weaverec import merging as M
from recbole_weaverec.errors import ConfigError, LLMNotFoundError
from recbole_weaverec.merging.streaming import MergedDeltas, fold_merged
from recbole_weaverec.model.llm.backbone import set_base_name
from recbole_weaverec.model.llm.prompts import IGNORE_INDEX
from recbole_weaverec.model.llm.scoring import score_candidates, score_users
from recbole_weaverec.model.llm.training import LoraLearner, LoraSettings, add_lora
from recbole_weaverec.plan import formulas as F
from recbole_weaverec.plan import phases, shapes
from recbole_weaverec.plan.__main__ import main

REPO = Path(__file__).resolve().parent.parent
TOTAL = (0.85, 1.2)
ABOVE = (0.85, 1.3)
R = 8
# two sizes and both layouts the paper's runs use: tied Llama (SmolLM2) and untied Qwen2 with q/k/v biases
MODELS = {"llama-h128": ("llama", 128, 384, 4, 4, 2, 8192), "qwen2-h256": ("qwen2", 256, 768, 6, 8, 2, 4096)}


def peak_bytes(fn):
    """(peak of torch's CPU allocations inside ``fn()`` above its start, what ``fn`` returned): every allocation
    and free the profiler records, in time order, temporaries inside one op included (tracemalloc and the ops'
    net ``self_cpu_memory_usage`` miss those)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    assert events, "the profiler recorded no allocation"
    now = peak = 0
    for _, change in events:
        now += change
        peak = max(peak, now)
    return peak, out


def build(name, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, h, i, layers, heads, kv, vocab = MODELS[name]
    config_class, model_class = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    config = config_class(vocab_size=vocab, hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                          tie_word_embeddings=kind == "llama")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = model_class(config).to(dtype).eval().requires_grad_(False)
    set_base_name(model, f"tiny-{name}")
    return model, shapes.shape_of(config.to_dict(), name)


def model_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check(what, estimate, base, above):
    """``estimate`` (a Phase) against the measured ``base`` (weights etc. present before) + ``above`` bytes."""
    measured = base + above
    est_above = estimate.total - base
    print(f"\n| {what} | {measured / 2**20:.1f} | {estimate.total / 2**20:.1f} | {estimate.total / measured:.2f} | "
          f"{above / 2**20:.2f} | {est_above / 2**20:.2f} | {est_above / above:.2f} |")
    assert TOTAL[0] <= estimate.total / measured <= TOTAL[1], (what, estimate.terms, measured)
    assert ABOVE[0] <= est_above / above <= ABOVE[1], (what, estimate.terms, above)


def test_profiler_sees_torch_storage():
    x = torch.randn(1000, 4096)
    peak, _ = peak_bytes(lambda: torch.logsumexp(x, dim=-1))  # one fp32 temporary of x's size inside one op
    assert x.numel() * 4 <= peak < x.numel() * 4 * 1.1
    peak, _ = peak_bytes(lambda: [torch.ones(2**20) for _ in range(3)][-1].sum())
    assert peak >= 3 * 2**22


# (batch, longest prompt+answer, answer, train_tokens_per_pass, gradient checkpointing, bf16, lora_dropout, attention)
TRAIN_CASES = [(2, 512, 8, None, False, False, 0.0, "sdpa"), (4, 256, 8, 1024, True, True, 0.0, "sdpa"),
               (4, 256, 8, 512, False, True, 0.05, "sdpa"), (1, 768, 12, 1024, True, False, 0.0, "sdpa"),
               (2, 384, 8, None, False, True, 0.0, "sdpa"), (2, 384, 8, None, False, True, 0.0, "eager"),
               (4, 256, 8, 1024, True, True, 0.0, "eager"), (1, 512, 8, None, False, False, 0.0, "eager")]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", TRAIN_CASES,
                         ids=lambda c: f"B{c[0]}-tpp{c[3]}-ckpt{c[4]}-bf16{c[5]}-drop{c[6]}-{c[7]}")
def test_training_step_estimate(name, case):
    batch, seq, answer, per_pass, ckpt, bf16, dropout, attention = case
    model, shape = build(name)
    settings = LoraSettings(r=R, alpha=16, dropout=dropout, batch_size=batch, grad_accum=1, epochs=1, bf16=bf16,
                            tokens_per_pass=per_pass or 0, gradient_checkpointing=ckpt,
                            attention=None if attention == "sdpa" else attention)
    g = torch.Generator().manual_seed(0)
    encoded = {}
    for k in range(batch):  # prompts of different lengths: rows are left-padded as in real batches
        ids = torch.randint(3, shape.vocab, (seq - 2 * k,), generator=g).tolist()
        encoded[k] = (ids, [IGNORE_INDEX] * (len(ids) - answer) + ids[-answer:])
    builder = type("Builder", (), {"tokenizer": type("Tok", (), {"pad_token_id": 0})()})()

    def one_step():  # LoRA added, AdamW made and one optimizer step: what the first step of a run allocates
        peft_model = add_lora(model, settings)
        learner = LoraLearner(peft_model, settings, batch)
        learner._encoded.update(encoded)  # already tokenised: samples are their keys
        learner.epoch(list(encoded), builder, {}, 0)
        peft_model.unload()

    above, _ = peak_bytes(one_step)
    rows = phases.pass_rows(batch, seq, per_pass)
    estimate = F.training(shape, F.Training(rows, seq, answer, R, F.LINEARS, dropout, 4, bf16, ckpt,
                                            attention=attention))
    check(f"train {name} rows={rows}×{seq} ckpt={ckpt} bf16={bf16} dropout={dropout} {attention}", estimate,
          model_bytes(model), above)


def random_adapters(model, k):
    """``k`` all-linear LoRA adapters of rank R with random factors, as lazy deltas (factors only, fp32)."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(k):
        state = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in F.LINEARS:
                state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(R, module.in_features, generator=gen)
                state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, R, generator=gen)
        out.append(M.lora_deltas((state, {"peft_type": "LORA", "r": R, "lora_alpha": 2 * R}), base_model=model,
                                 lazy=True))
    return out


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k,method,dtype", [(2, "average", torch.float32), (4, "weights", torch.bfloat16),
                                            (3, "ties", torch.float32)])
def test_streamed_merge_estimate(name, k, method, dtype):
    model, shape = build(name, dtype)
    deltas = random_adapters(model, k)
    weights = None if method == "average" else [1.0 / k] * k
    above, _ = peak_bytes(lambda: fold_merged(model, MergedDeltas(deltas, weights, method, density=0.2, seed=0)))
    w = 2 if dtype == torch.bfloat16 else 4
    estimate = F.merging(shape, F.Merge(k, R, F.LINEARS, method, w, host=True))
    factors = k * F.lora_params(shape, R, F.LINEARS) * 4
    check(f"merge {name} K={k} {method} {dtype}", estimate, model_bytes(model) + factors, above)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k,prompt,dtype", [(2, 300, torch.float32), (3, 600, torch.float32),
                                            (2, 300, torch.bfloat16)])
def test_learned_merge_step_estimate(name, k, prompt, dtype):
    """One λ step of WeaveRec.learn_merge: FactorMerge hooks, a user's 30 candidates scored with the graph kept,
    the entropy's backward and Adam on λ."""
    from recbole_weaverec.merging.streaming import FactorMerge

    model, shape = build(name, dtype)
    deltas = random_adapters(model, k)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, shape.vocab, (prompt,), generator=g).tolist()
    answers = [torch.randint(3, shape.vocab, (11,), generator=g).tolist() for _ in range(30)]

    def step():
        merge = FactorMerge(deltas)
        optimizer = torch.optim.Adam(merge.parameters(), lr=0.05)
        with merge.applied(model):
            logp = torch.log_softmax(score_candidates(model, ids, answers, grad=True), dim=0)
            optimizer.zero_grad()
            (-(logp.exp() * logp).sum()).backward()
            optimizer.step()

    above, _ = peak_bytes(step)
    w = 2 if dtype == torch.bfloat16 else 4
    estimate = F.learned_fit(shape, F.LearnedFit(k, R, F.LINEARS, prompt, 10, 30, w))
    factors = k * F.lora_params(shape, R, F.LINEARS) * 4  # already on this device (the CPU) before the step
    check(f"λ fit {name} K={k} P={prompt} 30×10 {dtype}", estimate, model_bytes(model) + factors, above)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("prompt,answer,chunk,users,dtype", [(400, 11, 64, 1, torch.float32),
                                                             (1200, 16, 8, 1, torch.float32),
                                                             (300, 11, 64, 3, torch.float32),
                                                             (600, 11, 16, 1, torch.bfloat16)])
def test_scoring_estimate(name, prompt, answer, chunk, users, dtype):
    model, shape = build(name, dtype)
    g = torch.Generator().manual_seed(2)
    batch = [(torch.randint(3, shape.vocab, (prompt,), generator=g).tolist(),
              [torch.randint(3, shape.vocab, (answer,), generator=g).tolist() for _ in range(30)])
             for _ in range(users)]
    if users == 1:
        above, _ = peak_bytes(lambda: score_candidates(model, *batch[0], chunk_size=chunk))
    else:
        above, _ = peak_bytes(lambda: score_users(model, batch, chunk_size=chunk))
    w = 2 if dtype == torch.bfloat16 else 4
    estimate = F.scoring(shape, F.Scoring(prompt, answer - 1, min(chunk, 30), users, w))
    check(f"score {name} P={prompt} chunk={min(chunk, 30)}×{answer - 1} B={users} {dtype}", estimate,
          model_bytes(model), above)


def test_shape_counts_every_parameter():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    for name in MODELS:
        model, shape = build(name)
        assert shape.params() == sum(p.numel() for p in model.parameters()), name
    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert shapes.shape_of(config).params() == sum(p.numel() for p in Qwen3ForCausalLM(config).parameters())
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        shapes.shape_of({"model_type": "gpt2", "n_embd": 64})


def test_embedded_gguf_metadata_gives_the_folder_config(tmp_path):
    from recbole_weaverec.model.llm.backbone import embedded_folder

    folder = embedded_folder()  # the HF folder a run builds from the GGUF (weights dequantised)
    from_folder, source = shapes.llm_shape("embedded", cache_dir=folder.parent)
    from_gguf, gguf_source = shapes.llm_shape("embedded", cache_dir=tmp_path)  # no folder there: the GGUF header
    assert "GGUF metadata" in gguf_source and "config.json" in source
    assert from_gguf == from_folder and from_gguf.params() == 134_515_008


def test_hub_name_without_config_asks_for_one(monkeypatch):
    monkeypatch.setattr(shapes.hub, "in_cache", lambda name, filename="config.json": False)
    monkeypatch.setattr(shapes.hub, "unavailable_reason", lambda name: "the hub is offline")
    with pytest.raises(LLMNotFoundError, match="pass --llm-config FILE.json"):
        shapes.llm_shape("someone/unknown-lm")
    shape, source = shapes.llm_shape("Qwen/Qwen2-7B-Instruct")  # the paper's LM: public config values
    assert shape.params() == 7_615_616_512 and "table" in source


def test_prompt_bound_holds_for_real_prompts():
    from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
    from recbole_weaverec.model.llm.prompts import PromptBuilder

    tokenizer = load_tokenizer(str(embedded_folder()))
    words = "wooden puzzle set for kids with colourful pieces and a storage box " * 12
    titles = [words[i * 5:] for i in range(80)]  # each far longer than the cut
    for history, listed, cut in ((50, 30, 64), (5, 30, 10), (5, 0, 10)):
        builder = PromptBuilder(tokenizer, history, cut, True, None)
        real = len(builder.prompt_ids(titles[:history], titles[:listed] if listed else None))
        bound = phases.prompt_tokens({"max_title_tokens": cut, "max_history": history, "max_prompt_tokens": None},
                                     listed)
        assert real <= bound <= 1.15 * real, (history, listed, cut, real, bound)
        assert len(builder.answer_ids(titles[0])) == cut + phases.END_OF_TURN_TOKENS
    assert phases.prompt_tokens({"max_title_tokens": 64, "max_history": 50, "max_prompt_tokens": 1200}, 30) == 1200
    assert phases.pass_rows(8, 5425, 1024) == 1 and phases.pass_rows(8, 100, 1024) == 8
    assert phases.pass_rows(8, 300, 1024) == 3 and phases.pass_rows(8, 300, None) == 8


def test_plan_of_the_default_run_prints_three_phases(capsys, run_dir):
    assert main(["--model=WeaveRec", "--device-memory=64"]) == 0
    out = capsys.readouterr().out
    assert "embedded SmolLM2-135M" in out and "merge of K=2 adapters (average)" in out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("training ", "merge + fold", "scoring "))]
    assert rows == ["training", "merge", "scoring"], out
    assert "fits: peak" in out


def test_paper_config_is_planned_offline_and_refused_on_a_small_gpu(capsys, run_dir):
    args = ["--model=WeaveRec", f"--config_files={REPO / 'configs' / 'weaverec_paper_gpu.yaml'}", "--on", "cuda"]
    assert main(args + ["--device-memory=80"]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen2-7B-Instruct: 7.62B parameters" in out and "5360 tokens" in out
    training = next(line for line in out.splitlines() if line.startswith("training "))
    assert 14.2 < float(training.split()[1]) < 30  # 15.2 GB of bf16 weights + activations of a 5.4k-token pass
    assert main(args + ["--device-memory=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the plan does not fit in 16.0 GiB") and "training needs" in err[0]
    # a learned merge keeps the graph of a 7k-token pass with K fp32 products per adapted layer: ~135 GiB
    assert main(args + ["--device-memory=80", "--weave_merge=learned"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "merge λ fit needs" in err[0] and "weave_merge: average" in err[0], err


def test_llm_config_file_replaces_llm_path(capsys, run_dir):
    config = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": True}
    (run_dir / "lm.json").write_text(json.dumps(config))
    assert main(["--model=LLMRec", "--llm-config", str(run_dir / "lm.json")]) == 0
    out = capsys.readouterr().out
    assert "config from --llm-config" in out and "vocabulary 1000" in out and "merge + fold" not in out
    assert main(["--model=LLMRec", "--llm-config", str(run_dir / "missing.json")]) == 2
    assert "--llm-config" in capsys.readouterr().err


def test_bad_planner_input_is_one_line(capsys, run_dir):
    for args, expected in ((["--model=LLMRec", "--device-memory=-1"], "--device-memory=-1.0 is not allowed"),
                           (["--model=EASE"], "model 'EASE' is not planned"),
                           (["--model=LLMRec", "--lora_target_modules=[c_attn]"], "names no linear layer")):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)


def test_command_refuses_a_plan_that_cannot_fit(run_dir):
    proc = subprocess.run([sys.executable, "-m", "recbole_weaverec.plan", "--model=LLMRec", "--device-memory=0.5"],
                          capture_output=True, text=True, timeout=300, cwd=run_dir)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the plan does not fit in 0.5 GiB of device memory: training "
                                               "needs ~"), proc.stderr
    assert "phase" in proc.stdout and "training" in proc.stdout  # the table is printed before the refusal


@pytest.mark.parametrize("name", MODELS)
def test_scoring_compute_counts_the_scorers_matmuls(name):
    """plan.compute's FLOPs of one user equal torch's FlopCounterMode count of the real scorer (eager attention, so
    attention is counted too; eager computes the prompt's full score matrix, a causal kernel skips half of it)."""
    from torch.utils.flop_counter import FlopCounterMode

    from recbole_weaverec.plan import compute as C

    model, shape = build(name)
    model.set_attn_implementation("eager")
    g = torch.Generator().manual_seed(3)
    prompt, answer, chunk = 150, 9, 16
    ids = torch.randint(3, shape.vocab, (prompt,), generator=g).tolist()
    answers = [torch.randint(3, shape.vocab, (answer,), generator=g).tolist() for _ in range(30)]
    with FlopCounterMode(display=False) as counter:
        score_candidates(model, ids, answers, chunk_size=chunk)
    counted = counter.get_total_flops()
    planned = sum(C.scoring_flops(shape, C.ScoringCompute(prompt, answer - 1, 30, chunk)).values())
    assert planned + C.attention_flops(shape, prompt, prompt) / 2 == pytest.approx(counted, rel=1e-3)


def test_plan_gives_scoring_time_per_thousand_users_at_a_given_rate(capsys, run_dir):
    from recbole_weaverec.plan import compute as C

    args = ["--model=WeaveRec", f"--config_files={REPO / 'configs' / 'weaverec_paper_gpu.yaml'}", "--on", "cuda"]
    assert main(args + ["--tflops=300"]) == 0
    out = capsys.readouterr().out
    flops = float(next(line for line in out.splitlines() if line.startswith("compute: scoring")).split()[2])
    minutes = float(next(line for line in out.splitlines() if line.startswith("time: scoring")).split()[2][1:])
    assert minutes == pytest.approx(C.per_thousand_users(flops * 1e12, 300) / 60, rel=1e-2)
    assert 50 < flops < 200  # 7.6B parameters over a ~5.4k-token prompt + 30 answers of ~66 tokens
    assert main(args + ["--tflops=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tflops=0.0 is not allowed" in err[0]
