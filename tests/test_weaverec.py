"""WeaveRec on a tiny random Llama (real SmolLM2 tokenizer) and tiny synthetic domains; one CLI run on slices of
two shared Amazon domains."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED_DATA, needs_shared_data, write_tiny_dataset
from recbole_weaverec.testing import write_slice
from recbole_weaverec import merging
from recbole_weaverec.config import ConfigError
from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
from recbole_weaverec.testing import tiny_llama
from recbole_weaverec.model.llm.scoring import score_candidates
from recbole_weaverec.model.llm.training import LoraSettings, add_lora, save_adapter
from recbole_weaverec.model.llm.samples import encode_sample, load_source

SMALL = {"max_train_samples": 6, "weave_target_samples": 5, "weave_source_samples": 3, "max_history": 3,
         "max_title_tokens": 5, "num_prompt_candidates": 6, "train_batch_size": 4, "eval_sample_users": 4,
         "show_progress": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(embedded_folder()))


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tinyllm")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_domain(root, name, word, seed):
    """A tiny domain whose titles all contain ``word`` (so a title's domain can be told from its text)."""
    write_tiny_dataset(root, name, n_users=30, n_items=20, seed=seed)
    item = Path(root) / name / f"{name}.item"
    item.write_text(item.read_text().replace("Widget", word))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_domain(root, "toys", "Widget", 0)
    write_domain(root, "beauty", "Lipstick", 1)
    write_domain(root, "sports", "Racket", 2)
    return root


class FakeTrainer:
    """What WeaveRec.prepare reads from its trainer."""

    def __init__(self, checkpoint_dir, valid_data=None):
        self.checkpoint_dir = str(checkpoint_dir)
        self.weave_valid_data = valid_data
        self.logger = logging.getLogger("test_weaverec")


def build(data, llm_folder, sources=("beauty",), **over):
    from recbole_weaverec.model.llm.weaverec import WeaveRec
    from recbole_weaverec.quick_start import build_config, prepare

    config = build_config("WeaveRec", "toys", config_dict={"data_path": str(data), "llm_path": llm_folder,
                                                           "source_domains": list(sources), **SMALL, **over})
    _, train, valid, test = prepare(config)
    return WeaveRec(config, train._dataset), valid, test


def handmade(tokenizer, folder, a, b, r=4, modules=("q_proj", "v_proj"), base=None):
    """A saved adapter (over the tiny model saved at ``base``) with constant A and B: ΔW = (α/r)·B·A is known."""
    peft_model = add_lora(tiny_llama(tokenizer, seed=0, name=base or "tiny-random-llama"),
                          LoraSettings(r=r, alpha=8, dropout=0.0, target_modules=list(modules)))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.fill_(a)
            elif "lora_B" in n:
                p.fill_(b)
    save_adapter(peft_model, folder)
    return str(folder)


# --- data ----------------------------------------------------------------------------------------------------------
def test_hybrid_data_has_the_configured_counts_and_keeps_each_domain_apart(data, llm_folder):
    model, _, _ = build(data, llm_folder)
    source = load_source(model.config, "beauty")
    mixed = model.hybrid_samples(source)
    counts = {d: sum(s.domain == d for s in mixed) for d in ("toys", "beauty")}
    assert counts == {"toys": 5, "beauty": 3} and len(mixed) == 8
    assert mixed == model.hybrid_samples(source)  # reproducible
    assert [s.domain for s in mixed] != ["toys"] * 5 + ["beauty"] * 3  # shuffled together
    domains = {"toys": model.target, "beauty": source}
    for s in mixed:
        own = domains[s.domain]
        ids = (*s.history, s.target, *s.candidates)
        assert all(0 < i < own.item_num for i in ids)
        ids_text, labels = encode_sample(s, model.builder, domains)
        text = model.tokenizer.decode(ids_text)
        # titles come from the sample's own domain, never from the target's id space
        assert ("Lipstick" in text) == (s.domain == "beauty") and ("Widget" in text) == (s.domain == "toys")
    # θ0 trains on the target only; the hybrid's key records both sizes
    assert model.hybrid_key("beauty")["domains"] == {"toys": 5, "beauty": 3}
    assert model.module_names == ["toys", "toys~beauty"]


# --- merging ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["average", "weights"])
def test_merge_of_given_modules_with_different_ranks(data, llm_folder, tokenizer, tmp_path, method):
    f0 = handmade(tokenizer, tmp_path / "t0", 0.1, 0.2, r=4, base=llm_folder)
    f1 = handmade(tokenizer, tmp_path / "t1", 0.05, -0.1, r=8, base=llm_folder)
    over = {"weave_merge": method, "weave_compare_target_only": False,
            "adapter_paths": {"toys": f0, "toys~beauty": f1}}
    if method == "weights":
        over["weave_weights"] = [0.8, 0.2]
    model, _, _ = build(data, llm_folder, **over)
    w0 = {k: v.clone() for k, v in model.llm.state_dict().items()}
    d0, d1 = merging.lora_deltas(f0), merging.lora_deltas(f1)
    model.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert model.folded and not list((tmp_path / "ckpt").glob("*/*"))  # nothing trained, nothing written
    c = (0.5, 0.5) if method == "average" else (0.8, 0.2)
    assert d0 and set(d0) == set(d1)
    for key in d0:
        expected = w0[key + ".weight"] + c[0] * d0[key] + c[1] * d1[key]
        assert torch.allclose(model.llm.get_submodule(key).weight, expected, atol=1e-6), key
    # values check: (α/r)·Σ_r a·b
    assert torch.allclose(d0[key], torch.full_like(d0[key], 8 / 4 * 4 * 0.1 * 0.2))
    assert torch.allclose(d1[key], torch.full_like(d1[key], 8 / 8 * 8 * 0.05 * -0.1))
    # zero inference overhead: the evaluated model is a plain model with the base model's parameters
    assert model.num_parameters() == sum(v.numel() for v in w0.values() if v.dtype.is_floating_point) or \
        model.num_parameters() == sum(p.numel() for p in tiny_llama(tokenizer).parameters())
    assert not any("lora" in n for n, _ in model.llm.named_parameters())


def test_modules_adapting_different_layers_are_refused(data, llm_folder, tokenizer, tmp_path):
    f0 = handmade(tokenizer, tmp_path / "t0", 0.1, 0.2, modules=("q_proj", "v_proj"), base=llm_folder)
    f1 = handmade(tokenizer, tmp_path / "t1", 0.1, 0.2, modules=("q_proj", "k_proj"), base=llm_folder)
    model, _, _ = build(data, llm_folder, adapter_paths={"toys": f0, "toys~beauty": f1})
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    with pytest.raises(merging.AdapterMismatchError, match="'toys' and 'toys~beauty' adapt different modules"):
        model.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert all(torch.equal(model.llm.state_dict()[k], v) for k, v in before.items())  # nothing folded


def test_learned_merge_trains_only_lambda_and_folded_equals_patched(data, llm_folder, tokenizer, tmp_path):
    f0 = handmade(tokenizer, tmp_path / "t0", 0.1, 0.3, base=llm_folder)
    f1 = handmade(tokenizer, tmp_path / "t1", 0.1, -0.3, r=8, base=llm_folder)
    model, valid, _ = build(data, llm_folder, weave_merge="learned", weave_learn_steps=4, weave_learn_users=3,
                            weave_learn_lr=0.5, adapter_paths={"toys": f0, "toys~beauty": f1})
    base = {k: v.clone() for k, v in model.llm.state_dict().items()}
    deltas = [merging.lora_deltas(f, lazy=True) for f in (f0, f1)]  # factors: the learned merge is in factor form
    users = model.validation_users(valid, 3)
    assert len(users) == 3 and all(len(c) == 30 for _, c, _ in users)  # history + its uni29 candidates, no labels
    merged = model.learn_merge(deltas, FakeTrainer(tmp_path / "ckpt", valid))
    # λ moved away from its init (uniform weights), the LLM's own weights did not
    assert not torch.allclose(model.learned_lambda, torch.ones_like(model.learned_lambda))
    assert all(torch.equal(model.llm.state_dict()[k], v) for k, v in base.items())
    assert not any(p.requires_grad for p in model.llm.parameters())
    lam = model.learned_lambda
    key = next(iter(merged))
    w = torch.softmax(lam[list(merged).index(key)], dim=0)
    assert torch.allclose(merged[key], w[0] * deltas[0][key] + w[1] * deltas[1][key], atol=1e-6)
    # the merged adapter computed on the fly (patched W0 + ΔW) scores like the folded model
    history, candidates, _ = users[0]
    prompt = model.builder.prompt_ids(model._titles(history), model._titles(candidates))
    answers = [model.builder.answer_ids(model.target.titles[c]) for c in candidates]
    with merging.patched(model.llm, merged):
        unfolded = score_candidates(model.llm, prompt, answers)
    plain = score_candidates(model.llm, prompt, answers)
    merging.fold_deltas(model.llm, merged)
    folded = score_candidates(model.llm, prompt, answers)
    assert not torch.allclose(unfolded, plain, atol=1e-3)
    assert torch.allclose(folded, unfolded, atol=1e-4)


def test_learned_merge_lowers_the_candidate_entropy(data, llm_folder, tokenizer, tmp_path):
    f0 = handmade(tokenizer, tmp_path / "t0", 0.1, 0.3, base=llm_folder)
    f1 = handmade(tokenizer, tmp_path / "t1", 0.1, -0.3, base=llm_folder)
    model, valid, _ = build(data, llm_folder, weave_merge="learned", weave_learn_users=1,
                            adapter_paths={"toys": f0, "toys~beauty": f1})
    deltas = [merging.lora_deltas(f, lazy=True) for f in (f0, f1)]  # factors: the learned merge is in factor form
    (user,) = model.validation_users(valid, 1)

    def entropy(merged):
        with merging.patched(model.llm, merged), torch.no_grad():
            return float(model.candidate_entropy(*user))

    start = entropy(merging.merge_deltas(deltas))
    model.config["weave_learn_steps"], model.config["weave_learn_lr"] = 8, 0.5
    end = entropy(model.learn_merge(deltas, FakeTrainer(tmp_path / "c", valid)))
    assert end < start


# --- modules: training, multi-source, resuming ----------------------------------------------------------------
def test_multi_source_trains_n_plus_one_modules_and_a_rerun_resumes(data, llm_folder, tmp_path, monkeypatch):
    from recbole_weaverec.model.llm import training

    over = {"adapter_dir": str(tmp_path / "adapters"), "weave_compare_target_only": False}
    model, _, _ = build(data, llm_folder, sources=("beauty", "sports"), **over)
    assert model.module_names == ["toys", "toys~beauty", "toys~sports"]
    trained = []
    real = training.train_adapter

    def interrupted(base, samples, builder, domains, settings, folder, *a, **k):
        if Path(folder).name == "toys~sports":
            raise KeyboardInterrupt  # the run dies while training the last module
        trained.append((Path(folder).name, {d: sum(s.domain == d for s in samples) for d in domains}))
        return real(base, samples, builder, domains, settings, folder, *a, **k)

    monkeypatch.setattr(training, "train_adapter", interrupted)
    before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    with pytest.raises(KeyboardInterrupt):
        model.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert [n for n, _ in trained] == ["toys", "toys~beauty"]
    assert trained[0][1] == {"toys": 6} and trained[1][1] == {"toys": 5, "beauty": 3}
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["toys", "toys~beauty"]  # no half folder
    assert all(torch.equal(model.llm.state_dict()[k], v) for k, v in before.items())  # base untouched

    trained.clear()
    monkeypatch.setattr(training, "train_adapter", lambda *a, **k: trained.append(Path(a[5]).name) or real(*a, **k))
    model, _, _ = build(data, llm_folder, sources=("beauty", "sports"), **over)
    model.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert trained == ["toys~sports"]  # only the missing module trains
    assert sorted(model.adapter_folders) == ["toys", "toys~beauty", "toys~sports"]
    meta = json.loads((tmp_path / "adapters" / "toys~sports" / "recbole_weaverec.json").read_text())
    assert meta["samples"] == {"toys": 5, "sports": 3}
    assert model.merge_weights == pytest.approx([1 / 3] * 3)

    trained.clear()
    model, _, _ = build(data, llm_folder, sources=("beauty", "sports"), **over)
    model.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert trained == []  # everything reused


def test_default_adapter_folder_depends_on_the_training_settings(data, llm_folder, tmp_path):
    a, _, _ = build(data, llm_folder)
    b, _, _ = build(data, llm_folder, weave_source_samples=4)
    c, _, _ = build(data, llm_folder, sources=("sports",))
    ra, rb, rc = (m.default_adapter_root(tmp_path) for m in (a, b, c))
    assert ra != rb and ra == rc  # θ0 is shared by runs with other sources
    assert ra.parent == tmp_path / "weaverec-adapters"


# --- bad input -----------------------------------------------------------------------------------------------------
def test_comparison_rows_equal_llmrec_untrained_and_recbole_pop(data, llm_folder, tmp_path, monkeypatch):
    """The main job's table: θ0, zero-shot and Pop on WeaveRec's users and candidates equal separate runs."""
    from recbole_weaverec.model.llm.backbone import load_backbone
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    common = {"data_path": str(data), "eval_mode": "uni29", "metrics": ["NDCG", "Hit"], "topk": [1, 5],
              "valid_metric": "NDCG@5", "eval_sample_users": 8, "show_progress": False}
    llm = {**SMALL, **common, "llm_path": llm_folder, "adapter_dir": str(tmp_path / "adapters")}
    out = run("WeaveRec", "toys", config_dict={**llm, "source_domains": ["beauty"]})
    assert set(out) >= {"target_only_test_result", "zero_shot_test_result", "pop_test_result"}
    pop = run("Pop", "toys", config_dict=common)["test_result"]
    assert out["pop_test_result"] == pop
    theta0 = run("LLMRec", "toys", config_dict={**llm, "adapter_paths": {"toys": str(tmp_path / "adapters" / "toys")}})
    assert out["target_only_test_result"] == theta0["test_result"]
    model, _, _ = load_backbone(llm_folder)
    untrained = str(save_adapter(add_lora(model, LoraSettings(r=4, alpha=8)), tmp_path / "untrained"))
    zero = run("LLMRec", "toys", config_dict={**llm, "adapter_paths": {"toys": untrained}})
    assert out["zero_shot_test_result"] == zero["test_result"]
    assert out["zero_shot_test_result"] != out["target_only_test_result"]  # θ0 moved the model


def test_bad_input_is_refused_in_one_line(data, llm_folder):
    from recbole_weaverec.quick_start import build_config

    base = {"data_path": str(data), "llm_path": llm_folder}
    with pytest.raises(ConfigError, match="source_domains is empty.*LLMRec"):
        build_config("WeaveRec", "toys", config_dict={**base, "source_domains": []})
    with pytest.raises(ConfigError, match="source_domains is empty.*LLMRec"):
        build_config("WeaveRec", "toys", config_dict=base)  # no default source outside the bundled sample
    with pytest.raises(ConfigError, match="target dataset 'toys'"):
        build_config("WeaveRec", "toys", config_dict={**base, "source_domains": ["beauty", "toys"]})
    with pytest.raises(ConfigError, match="weave_merge='median'"):
        build_config("WeaveRec", "toys", config_dict={**base, "source_domains": ["beauty"], "weave_merge": "median"})
    with pytest.raises(ConfigError, match="weave_weights=.*2 numbers"):
        build_config("WeaveRec", "toys", config_dict={**base, "source_domains": ["beauty"], "weave_merge": "weights",
                                                      "weave_weights": [1.0]})
    with pytest.raises(ConfigError, match="weave_temperature"):
        build_config("WeaveRec", "toys", config_dict={**base, "source_domains": ["beauty"],
                                                      "weave_temperature": 0})


def test_bundled_sample_gets_its_default_source():
    from recbole_weaverec.quick_start import build_config

    config = build_config("WeaveRec", "toys-sample", config_dict={"llm_path": "embedded"})
    assert config["source_domains"] == ["beauty-sample"]


# --- end to end through the command -------------------------------------------------------------------------------
@needs_shared_data()
def test_cli_end_to_end_on_two_shared_domains(tmp_path, llm_folder):
    data = tmp_path / "data"
    write_slice(SHARED_DATA, "amazon-toys", data, n_users=50, seed=1)
    write_slice(SHARED_DATA, "amazon-beauty", data, n_users=50, seed=1)
    args = [sys.executable, str(REPO / "run_recbole_weaverec.py"), "--model=WeaveRec", "--dataset=amazon-toys",
            "--source_domains=[amazon-beauty]", f"--data_path={data}", f"--llm_path={llm_folder}",
            "--max_train_samples=4", "--weave_target_samples=3", "--weave_source_samples=3", "--eval_sample_users=3",
            "--show_progress=False", "--max_history=3", "--max_title_tokens=5", "--lora_r=4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "training LoRA amazon-toys~amazon-beauty:" in log and "training LoRA amazon-toys:" in log
    assert "merged 2 WeaveRec modules (average" in log
    assert "WeaveRec vs θ0 (LLMRec) vs zero-shot vs Pop on the same 3 test users" in log and "test result" in log
    root = next((tmp_path / "saved" / "weaverec-adapters").iterdir())
    assert sorted(p.name for p in root.iterdir()) == ["amazon-toys", "amazon-toys~amazon-beauty"]
    # rerun: both modules reused, nothing trained
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "training LoRA" not in log and log.count("reusing adapter") == 2
    # a source equal to the target: one line, nothing written
    bad = subprocess.run([*args[:4], "--source_domains=[amazon-toys]", *args[5:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "contains the target dataset 'amazon-toys'" in bad.stderr
    assert "Traceback" not in bad.stderr
