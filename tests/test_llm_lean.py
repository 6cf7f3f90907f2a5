"""The lean LLM path (issue 14.1-2): passes within a token budget, bf16-held frozen weights, length buckets,
gradient checkpointing and packed-answer scoring each leave the numbers of the plain path unchanged."""
import pytest
import torch

from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
from recbole_weaverec.testing import tiny_llama
from recbole_weaverec.model.llm.prompts import PromptBuilder
from recbole_weaverec.model.llm.scoring import packed_answers, score_candidates
from recbole_weaverec.testing import naive_scores
from recbole_weaverec.model.llm.training import LoraLearner, LoraSettings, add_lora, batches, frozen_weights_as, passes
from recbole_weaverec.model.llm.samples import DomainData, Sample

TITLES = ["", "Red wooden toy train with four wagons", "Blue puzzle cube", "Plush teddy bear large",
          "Magnetic alphabet letters for kids", "Board game of strategy", "Watercolor paint set 24 colours",
          "Remote control racing car", "Dollhouse furniture kit"]
SAMPLES = [Sample("toys", (1, 2, 3), 4, (4, 5, 6)), Sample("toys", (2, 3), 7, (8, 7, 1)),
           Sample("toys", (5,), 6, (6, 2, 3)), Sample("toys", (1, 4, 6, 8), 2, (2, 3, 5, 7, 8)),
           Sample("toys", (7,), 1, (1, 8))]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(embedded_folder()))


def trained(tokenizer, **kw):
    base = dict(r=4, alpha=8, dropout=0.0, learning_rate=1e-2, warmup_ratio=0.0, epochs=1, batch_size=5,
                grad_accum=1, seed=3)
    base.update(kw)
    model = add_lora(tiny_llama(tokenizer, seed=0), LoraSettings(**base))
    learner = LoraLearner(model, LoraSettings(**base), len(SAMPLES))
    loss = learner.epoch(SAMPLES, PromptBuilder(tokenizer, 5, 12, True),
                         {"toys": DomainData("toys", None, TITLES, len(TITLES))}, 0)
    return model, loss, learner


def lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_passes_keep_each_run_within_the_budget_and_in_order():
    encoded = [([0] * n, [0] * n) for n in (5, 3, 9, 2, 2, 7)]
    runs = passes(encoded, 12)
    assert [e for r in runs for e in r] == encoded
    assert all(len(r) * max(len(e[0]) for e in r) <= 12 or len(r) == 1 for r in runs)
    assert len(runs) > 1 and passes(encoded, 0) == [encoded]


def test_a_batch_split_into_passes_gives_the_same_update(tokenizer):
    whole, loss1, _ = trained(tokenizer)
    split, loss2, learner = trained(tokenizer, tokens_per_pass=150)
    a, b = lora(whole), lora(split)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert loss1 == pytest.approx(loss2, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_update_and_is_switched_off_after(tokenizer):
    plain, _, _ = trained(tokenizer)
    checked, _, _ = trained(tokenizer, gradient_checkpointing=True)
    for k, v in lora(plain).items():
        assert torch.allclose(v, lora(checked)[k], atol=1e-6), k
    assert not checked.get_base_model().is_gradient_checkpointing  # scoring needs the KV cache again


def test_bf16_training_moves_lora_and_gives_back_the_fp32_base_bit_for_bit(tokenizer):
    reference = tiny_llama(tokenizer, seed=0).state_dict()
    model, loss, _ = trained(tokenizer, bf16=True)
    assert loss > 0
    assert any(v.abs().sum() > 0 for k, v in lora(model).items() if "lora_B" in k)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name
        if not p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, reference[key]), name


def test_frozen_weights_as_restores_on_error(tokenizer):
    model = tiny_llama(tokenizer, seed=0).requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with frozen_weights_as(model, torch.bfloat16):
            assert next(model.parameters()).dtype == torch.bfloat16
            raise RuntimeError("stop")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_length_buckets_cover_every_sample_once_and_cut_padding():
    samples = list(range(64))
    lengths = [(i * 37) % 101 for i in samples]
    plain = batches(samples, 4, seed=1, epoch=0)
    bucketed = batches(samples, 4, seed=1, epoch=0, lengths=lengths, buckets=8)
    assert sorted(x for b in bucketed for x in b) == samples
    assert bucketed == batches(samples, 4, seed=1, epoch=0, lengths=lengths, buckets=8)  # seeded

    def padding(groups):
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)

    assert padding(bucketed) < padding(plain) / 2


def test_packed_mask_lets_each_answer_see_the_prompt_and_itself_only():
    ids, positions, mask, targets, owner = packed_answers([[5, 6, 7], [8], [9, 10]], n_prompt=4, device="cpu")
    assert ids.tolist() == [[5, 6, 9]] and targets.tolist() == [6, 7, 10] and owner.tolist() == [0, 0, 2]
    assert positions.tolist() == [[4, 5, 4]]  # each answer continues right after the prompt
    m = mask[0, 0].int().tolist()
    assert m == [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 1]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_scoring_equals_one_forward_per_candidate(tokenizer, attn):
    model = tiny_llama(tokenizer, seed=1)
    model.config._attn_implementation = attn
    b = PromptBuilder(tokenizer, 5, 12, True)
    prompt = b.prompt_ids(TITLES[1:4], TITLES[4:9])
    answers = [b.answer_ids(t) for t in TITLES[1:]] + [[tokenizer.eos_token_id]]
    slow = naive_scores(model, prompt, answers)
    for chunk in (2, 64):
        fast = score_candidates(model, prompt, answers, chunk_size=chunk)
        assert torch.allclose(fast, slow, atol=1e-5), (chunk, (fast - slow).abs().max())


def test_sum_scoring_is_each_answers_log_probability_single_and_batched(tokenizer):
    """``llm_score: sum``: the answer's log-probability (no length normalisation), on both scoring paths."""
    from recbole_weaverec.model.llm.scoring import score_users

    model = tiny_llama(tokenizer, seed=1)
    b = PromptBuilder(tokenizer, 5, 12, True)
    prompt = b.prompt_ids(TITLES[1:4], TITLES[4:9])
    answers = [b.answer_ids(t) for t in TITLES[1:]] + [[tokenizer.eos_token_id]]
    lengths = torch.tensor([len(a) for a in answers], dtype=torch.float32)
    total = naive_scores(model, prompt, answers) * lengths
    assert len(set(lengths.tolist())) > 1  # otherwise sum and mean would rank alike
    assert torch.allclose(score_candidates(model, prompt, answers, normalize=False), total, atol=1e-4)
    other = (b.prompt_ids(TITLES[2:3], TITLES[1:4]), answers[:3])
    batched = score_users(model, [(prompt, answers), other], normalize=False)
    assert torch.allclose(batched[0], total, atol=1e-4)
    assert torch.allclose(batched[1], naive_scores(model, *other) * lengths[:3], atol=1e-4)


def test_llm_score_reaches_the_scorer_and_is_checked(tmp_path, monkeypatch):
    from recbole_weaverec.config import ConfigError
    from recbole_weaverec.model.llm import base
    from recbole_weaverec.quick_start import build_config

    with pytest.raises(ConfigError, match=r"^llm_score='total' is not allowed: expected one of mean, sum$"):
        build_config("LLMRec", "toys-sample", config_dict={"llm_score": "total"})
    seen = []
    monkeypatch.setattr(base, "score_candidates", lambda *a, normalize=True, **k: seen.append(normalize) or
                        torch.zeros(len(a[2])))
    for rule in ("mean", "sum"):
        model = type("M", (), {"config": {"llm_score": rule, "score_chunk_size": 4}, "tokenizer": tokenizer_stub(),
                               "llm": None, "_user_inputs": lambda self, *r: ([1], [[2], [3]], [0, 1])})()
        base.LLMRecommender.score_user(model, [1], [2, 3])
    assert seen == [True, False]


def tokenizer_stub():
    return type("T", (), {"pad_token_id": 0})()


@pytest.mark.parametrize("given", [None, "8"])
def test_onednn_cache_cap_is_a_default_the_user_can_override(given):
    """The package caps oneDNN's primitive cache (the main job's memory, issue 14.1) unless the user set it."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if given is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = given
    code = ("import os, recbole_weaverec; from recbole_weaverec.compat import release_memory; "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], release_memory())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    cap, trimmed = out.split()
    assert cap == (given or "64")
    if sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION"):
        assert trimmed == "True"  # glibc: malloc_trim was called


def test_train_attention_eager_gives_the_same_update_and_the_model_keeps_its_own_kernel(tokenizer, monkeypatch):
    from transformers.models.llama import modeling_llama

    calls = []
    eager = modeling_llama.eager_attention_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return eager(*args, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting)
    plain, loss1, _ = trained(tokenizer)
    assert not calls  # the model's own kernel (sdpa) while training by default
    switched, loss2, _ = trained(tokenizer, attention="eager")
    assert calls  # every layer went through the eager kernel
    for k, v in lora(plain).items():
        assert torch.allclose(v, lora(switched)[k], atol=1e-5), k
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert switched.get_base_model().config._attn_implementation == plain.get_base_model().config._attn_implementation


def test_train_attention_is_checked_and_enters_the_adapter_key_only_when_set(tmp_path):
    from recbole_weaverec.config import ConfigError
    from recbole_weaverec.model.llm.training import training_key
    from recbole_weaverec.quick_start import build_config

    with pytest.raises(ConfigError, match=r"^train_attention='flash' is not allowed: expected one of sdpa, eager$"):
        build_config("LLMRec", "toys-sample", config_dict={"train_attention": "flash"})
    builder = PromptBuilder(load_tokenizer(str(embedded_folder())), 5, 10, True)
    keys = [training_key("base", {"toys": 8}, LoraSettings(attention=a), builder, 30)["settings"]
            for a in (None, "eager")]
    assert "attention" not in keys[0] and keys[1]["attention"] == "eager"  # old adapters' keys stay valid
    assert LoraSettings.from_config(build_config("LLMRec", "toys-sample",
                                                 config_dict={"train_attention": "eager"})).attention == "eager"


def test_train_compile_gives_the_same_update_and_leaves_the_layers_plain(tokenizer):
    from torch._dynamo.utils import counters

    from recbole_weaverec.model.llm.train_modes import compiler_found, decoder_layers

    if not compiler_found("cpu"):
        pytest.skip("no C++ compiler here: torch.compile cannot build CPU kernels")
    plain, loss1, _ = trained(tokenizer)
    before = counters["stats"]["unique_graphs"]
    compiled, loss2, _ = trained(tokenizer, compile=True)
    assert counters["stats"]["unique_graphs"] > before  # the layers really went through torch.compile
    for k, v in lora(plain).items():
        assert torch.allclose(v, lora(compiled)[k], atol=1e-5), k
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    layers = decoder_layers(compiled)
    assert layers and all(layer._compiled_call_impl is None for layer in layers)  # scoring runs the plain forward


def test_train_compile_auto_needs_a_compiler_and_enough_prompts_and_is_checked(monkeypatch):
    from recbole_weaverec.config import ConfigError
    from recbole_weaverec.model.llm import train_modes
    from recbole_weaverec.model.llm.training import training_key
    from recbole_weaverec.quick_start import build_config

    n = train_modes.COMPILE_MIN_PROMPTS
    monkeypatch.setattr(train_modes.shutil, "which", lambda name: "/usr/bin/" + name)
    assert train_modes.compile_wanted("auto", "cpu", n) and not train_modes.compile_wanted("auto", "cpu", n - 1)
    assert train_modes.compile_wanted(True, "cpu", 1) and not train_modes.compile_wanted(False, "cpu", 10 * n)
    monkeypatch.setattr(train_modes.shutil, "which", lambda name: None)
    assert not train_modes.compile_wanted("auto", "cpu", 10 * n)  # no C++ compiler: plain training
    with pytest.raises(ConfigError, match=r"^train_compile='yes' is not allowed: expected one of auto, True, False$"):
        build_config("LLMRec", "toys-sample", config_dict={"train_compile": "yes"})
    builder = PromptBuilder(load_tokenizer(str(embedded_folder())), 5, 10, True)
    keys = [training_key("base", {"toys": 8}, LoraSettings(compile=c), builder, 30) for c in ("auto", True, False)]
    assert keys[0] == keys[1] == keys[2]  # compiling executes the same training: adapters stay reusable
