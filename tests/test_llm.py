"""LLM core (LLMRec / LLMJoint / LLMMerge) on a tiny random Llama with the real SmolLM2 tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SHARED_DATA, needs_shared_data, write_tiny_dataset
from recbole_weaverec.testing import write_slice
from recbole_weaverec import merging
from recbole_weaverec.model.llm.backbone import (LLMNotFoundError, embedded_folder, load_tokenizer, resolve_llm_path,
                                                 set_base_name)
from recbole_weaverec.testing import tiny_llama
from recbole_weaverec.model.llm.prompts import IGNORE_INDEX, PromptBuilder
from recbole_weaverec.model.llm.scoring import score_candidates
from recbole_weaverec.testing import naive_scores
from recbole_weaverec.model.llm.training import (AdapterMismatchError, LoraLearner, LoraSettings, add_lora,
                                                 answer_loss, load_adapter, save_adapter, train_adapter)
from recbole_weaverec.model.llm.samples import DomainData, Sample, build_samples, collate

TITLES = ["", "Red wooden toy train with four wagons", "Blue puzzle cube", "Plush teddy bear large",
          "Magnetic alphabet letters for kids", "Board game of strategy", "Watercolor paint set 24 colours",
          "Remote control racing car", "Dollhouse furniture kit"]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(str(embedded_folder()))  # the real SmolLM2 tokenizer (chat template), loaded once


@pytest.fixture
def model(tokenizer):
    return tiny_llama(tokenizer, seed=0)


def domain(name="toys"):
    return DomainData(name, None, list(TITLES), len(TITLES))


def settings(**kw):
    base = dict(r=4, alpha=8, dropout=0.0, learning_rate=1e-2, warmup_ratio=0.0, epochs=1, batch_size=2,
                grad_accum=1, seed=3)
    base.update(kw)
    return LoraSettings(**base)


def samples(name="toys"):
    return [Sample(name, (1, 2, 3), 4, (4, 5, 6)), Sample(name, (2, 3), 7, (8, 7, 1)),
            Sample(name, (5,), 6, (6, 2, 3))]


# --- prompts ----------------------------------------------------------------------------------------------------
def test_prompt_truncates_history_and_titles_and_lists_candidates(tokenizer):
    b = PromptBuilder(tokenizer, max_history=2, max_title_tokens=3, prompt_candidates=True)
    text = b.prompt_text(["First item ever bought", "Blue puzzle cube", "Plush teddy bear large"],
                         ["Watercolor paint set 24 colours", "Board game"])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "First" not in text  # only the last max_history items
    assert "Blue puzzle cube" in text
    cut = b.truncate("Plush teddy bear large")
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= 3 and cut in text
    assert "Plush teddy bear large" not in text
    assert b.truncate("Watercolor paint set 24 colours") in text and "Board game" in text
    no_cands = PromptBuilder(tokenizer, 2, 3, prompt_candidates=False).prompt_text(["Blue puzzle cube"], ["Board game"])
    assert "Board game" not in no_cands and "Blue puzzle cube" in no_cands


def test_answer_only_loss_mask(tokenizer, model):
    b = PromptBuilder(tokenizer, 5, 12, True)
    ids, labels = b.training_ids(["Blue puzzle cube"], "Board game of strategy", ["Board game of strategy", "x"])
    answer = b.answer_ids("Board game of strategy")
    assert answer[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert labels[:len(ids) - len(answer)] == [IGNORE_INDEX] * (len(ids) - len(answer))
    assert labels[-len(answer):] == answer == ids[-len(answer):]
    # the batch loss (left padding, LM head on the last positions only) is the mean cross-entropy over the
    # answer tokens of each sample computed alone, without padding
    other = b.training_ids(["Plush teddy bear large", "Dollhouse"], "Blue puzzle cube")
    batch = collate([(ids, labels), other], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = answer_loss(model, batch)
        total, count = 0.0, 0
        for x, y in [(ids, labels), other]:
            logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, :-1].float(), -1)
            y = torch.tensor(y[1:])
            keep = y != IGNORE_INDEX
            total -= logp[keep].gather(-1, y[keep][:, None]).sum()
            count += int(keep.sum())
    assert count == len(answer) + len(b.answer_ids("Blue puzzle cube"))
    assert torch.allclose(loss, total / count, atol=1e-5)


# --- scoring ----------------------------------------------------------------------------------------------------
def test_kv_cache_scoring_equals_naive_log_likelihood(tokenizer, model):
    b = PromptBuilder(tokenizer, 5, 12, True)
    prompt = b.prompt_ids(TITLES[1:4], TITLES[4:9])
    answers = [b.answer_ids(t) for t in TITLES[1:]] + [[tokenizer.eos_token_id]]  # incl. a one-token answer
    fast = score_candidates(model, prompt, answers, chunk_size=3, pad_id=tokenizer.pad_token_id)
    slow = naive_scores(model, prompt, answers)
    assert fast.shape == (len(answers),)
    assert torch.allclose(fast, slow, atol=1e-4), (fast - slow).abs().max()
    # the cache of one call never leaks into the next (a fresh cache per user)
    assert torch.allclose(score_candidates(model, prompt, answers, chunk_size=64), fast, atol=1e-5)
    # differentiable variant (for learned merge coefficients): same values, gradients reach the weights
    with_grad = score_candidates(model, prompt, answers, grad=True)
    assert with_grad.requires_grad and torch.allclose(with_grad.detach().cpu(), fast, atol=1e-5)
    with_grad.logsumexp(0).backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


# --- training ---------------------------------------------------------------------------------------------------
def test_lora_step_changes_lora_weights_only_and_is_deterministic(tokenizer, model):
    b = PromptBuilder(tokenizer, 5, 12, True)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = add_lora(model, settings())
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)
    learner = LoraLearner(peft_model, settings(), 3)
    loss = learner.epoch(samples(), b, {"toys": domain()}, 0)
    assert loss > 0 and learner.tokens > 0
    lora_after = {n: p.detach() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(lora_before[n], lora_after[n]) for n in lora_before)
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_before[key]), name
    # same seed, same data -> the same adapter
    again = add_lora(tiny_llama(tokenizer, seed=0), settings())
    LoraLearner(again, settings(), 3).epoch(samples(), b, {"toys": domain()}, 0)
    for (n1, p1), (n2, p2) in zip(peft_model.named_parameters(), again.named_parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), n1


def test_train_adapter_saves_folder_and_leaves_base_clean(tokenizer, model, tmp_path):
    b = PromptBuilder(tokenizer, 5, 12, True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folder, _ = train_adapter(model, samples(), b, {"toys": domain()}, settings(), tmp_path / "toys")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    meta = json.loads((folder / "recbole_weaverec.json").read_text())
    assert meta["base_model"] == "tiny-random-llama" and meta["samples"] == {"toys": 3}
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    deltas = merging.lora_deltas(folder, base_model=model)
    assert deltas and any(d.abs().max() > 0 for d in deltas.values())


def test_samples_are_reproducible_and_keep_ids_in_their_domain():
    import numpy as np

    class Split:  # the fields of a RecBole sequential training split that build_samples reads
        config = {"ITEM_ID_FIELD": "item_id", "LIST_SUFFIX": "_list", "ITEM_LIST_LENGTH_FIELD": "item_length"}
        iid_field = "item_id"
        seqs = torch.tensor([[1, 2, 0], [1, 2, 3], [4, 0, 0], [5, 6, 7]])
        inter_feat = {"item_id_list": seqs, "item_length": torch.tensor([2, 3, 1, 3]),
                      "item_id": torch.tensor([3, 4, 5, 8])}

    d = DomainData("toys", Split(), list(TITLES), len(TITLES))
    a = build_samples(d, n=3, num_candidates=5, seed=1)
    assert a == build_samples(d, n=3, num_candidates=5, seed=1)
    assert len(a) == 3 and len(build_samples(d, n=None, num_candidates=0, seed=1)) == 4
    for s in a:
        assert s.domain == "toys" and s.target in s.candidates and len(set(s.candidates)) == 5
        assert not set(s.history) & (set(s.candidates) - {s.target})
        assert all(0 < i < len(TITLES) for i in s.candidates)
    assert build_samples(d, 3, 5, seed=2) != a or build_samples(d, 3, 5, seed=3) != a
    assert not np.array_equal([s.candidates for s in a], [s.candidates for s in build_samples(d, 3, 5, seed=9)])


# --- adapters and merging -----------------------------------------------------------------------------------------
def handmade_adapter(tokenizer, folder, value_a, value_b, name="tiny-random-llama"):
    """An adapter on q_proj/v_proj with constant A, B (so ΔW = (α/r)·B·A is known)."""
    model = tiny_llama(tokenizer, seed=0, name=name)
    peft_model = add_lora(model, settings(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_A" in n:
                p.fill_(value_a)
            elif "lora_B" in n:
                p.fill_(value_b)
    save_adapter(peft_model, folder)
    return folder


@pytest.mark.parametrize("method", ["average", "weights", "task_arithmetic", "ties"])
def test_merge_methods_on_handmade_adapters(tokenizer, tmp_path, method):
    from recbole_weaverec.model.llm.llmmerge import merge_weights

    f1 = handmade_adapter(tokenizer, tmp_path / "a", 0.1, 0.2)
    f2 = handmade_adapter(tokenizer, tmp_path / "b", 0.1, -0.1)
    scale = 8 / 4  # alpha / r
    d1, d2 = 4 * 0.1 * 0.2 * scale, 4 * 0.1 * -0.1 * scale  # every entry of B·A sums r products
    config = {"merge_method": method, "merge_weights": [0.7, 0.3] if method == "weights" else None,
              "merge_lambda": 0.5}
    w = merge_weights(config, 2)
    expected = {"average": (d1 + d2) / 2, "weights": 0.7 * d1 + 0.3 * d2, "task_arithmetic": 0.5 * (d1 + d2),
                "ties": d1}[method]  # TIES: the elected sign is d1's (larger total), d2 disagrees and is dropped
    deltas = [merging.lora_deltas(f) for f in (f1, f2)]
    merged = merging.merge_deltas(deltas, w, method, density=1.0)
    assert set(merged) == set(deltas[0]) and len(merged) == 4  # 2 layers x (q_proj, v_proj)
    for delta in merged.values():
        assert torch.allclose(delta, torch.full_like(delta, expected), atol=1e-6)
    # folded into the base weights: W + ΔW
    model = tiny_llama(tokenizer, seed=0)
    name = next(iter(merged))
    before = model.get_submodule(name).weight.detach().clone()
    merging.fold_deltas(model, merged)
    assert torch.allclose(model.get_submodule(name).weight, before + expected, atol=1e-6)


def test_merge_and_unload_scores_like_the_unmerged_adapter(tokenizer, model):
    b = PromptBuilder(tokenizer, 5, 12, True)
    peft_model = add_lora(model, settings())
    with torch.no_grad():  # a non-trivial adapter (B starts at 0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    prompt = b.prompt_ids(TITLES[1:3], TITLES[3:8])
    answers = [b.answer_ids(t) for t in TITLES[3:8]]
    plain = score_candidates(tiny_llama(tokenizer, seed=0), prompt, answers)
    unmerged = score_candidates(peft_model, prompt, answers)
    assert not torch.allclose(unmerged, plain, atol=1e-3)  # the adapter does change the scores
    folded = peft_model.merge_and_unload()
    assert not any("lora" in n for n, _ in folded.named_parameters())
    assert torch.allclose(score_candidates(folded, prompt, answers), unmerged, atol=1e-4)


def test_adapter_from_another_base_is_refused(tokenizer, tmp_path):
    folder = handmade_adapter(tokenizer, tmp_path / "other", 0.1, 0.1, name="some-other-llm")
    model = tiny_llama(tokenizer, seed=0)
    with pytest.raises(AdapterMismatchError, match="some-other-llm.*tiny-random-llama"):
        load_adapter(model, folder)
    with pytest.raises(merging.AdapterMismatchError, match="some-other-llm"):
        merging.check_same_base([folder], "tiny-random-llama")
    set_base_name(model, "some-other-llm")
    assert load_adapter(model, folder) is not None


def test_llm_path_errors_name_the_path_and_the_embedded_default(tmp_path):
    with pytest.raises(LLMNotFoundError, match=r"/no/such/model.*embedded"):
        resolve_llm_path("/no/such/model")
    with pytest.raises(LLMNotFoundError, match=r"not-a-real-org/no-model.*embedded"):
        resolve_llm_path("not-a-real-org/no-model")  # offline: the hub is never asked
    (tmp_path / "empty").mkdir()
    with pytest.raises(LLMNotFoundError, match="config.json"):
        resolve_llm_path(str(tmp_path / "empty"))


# --- configuration and data errors --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tinyllm")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_missing_source_domain_is_named(tmp_path, tiny_llm_folder):
    from recbole_weaverec.data.crossdomain import MissingDomainError
    from recbole_weaverec.quick_start import build_config

    data = write_tiny_dataset(tmp_path / "data")
    with pytest.raises(MissingDomainError, match="'nowhere'.*nowhere.inter"):
        build_config("LLMJoint", "tiny", config_dict={"data_path": str(data), "llm_path": tiny_llm_folder,
                                                      "source_domains": ["nowhere"]})


def test_items_without_title_error_unless_fallback(tmp_path):
    from recbole.data import create_dataset

    from recbole_weaverec.data.itemtext import MissingTextFieldError
    from recbole_weaverec.model.llm.samples import domain_data
    from recbole_weaverec.quick_start import build_config

    data = write_tiny_dataset(tmp_path / "data", titles=False)
    config = build_config("LLMRec", "tiny", config_dict={"data_path": str(data)})
    dataset = create_dataset(config)
    dataset.build()  # RecBole turns the item features into tensors here
    with pytest.raises(MissingTextFieldError, match="title"):
        domain_data("tiny", dataset, None, "title", None)
    d = domain_data("tiny", dataset, None, "title", "brand")
    assert d.titles[1].startswith("Brand") and len(d.titles) == dataset.item_num


def test_predict_groups_rows_by_user_and_never_lists_candidates_in_recbole_order(tmp_path, tiny_llm_folder):
    from recbole.data.interaction import Interaction

    from recbole_weaverec.model.llm.base import FullSortTooLargeError
    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.quick_start import build_config, prepare

    data = write_tiny_dataset(tmp_path / "data", n_items=12)
    config = build_config("LLMRec", "tiny", config_dict={"data_path": str(data), "llm_path": tiny_llm_folder,
                                                         "max_train_samples": 2, "show_progress": False,
                                                         "max_full_sort_items": 5})
    _, train_data, _, _ = prepare(config)
    model = LLMRec(config, train_data._dataset)
    listed = []
    original = model.builder.prompt_ids
    model.builder.prompt_ids = lambda h, c=None: listed.append(c) or original(h, c)
    cands = [[3, 1, 4, 5, 9, 2, 6, 8], [7, 1, 2, 3, 4, 5, 6, 8]]  # RecBole's order: true item first
    seq = torch.tensor([[1, 2, 0], [4, 5, 6]])
    rows = {"user_id": torch.tensor([1] * 8 + [2] * 8), "item_id": torch.tensor(cands[0] + cands[1]),
            "item_id_list": seq.repeat_interleave(8, 0), "item_length": torch.tensor([2] * 8 + [3] * 8)}
    scores = model.predict(Interaction(rows))
    assert len(listed) == 2  # one prompt per user, not per row
    for user, candidates in enumerate(cands):
        titles = [model.target.titles[i] for i in candidates]
        assert sorted(listed[user]) == sorted(titles) and listed[user] != titles
        history = seq[user][:2 + user].tolist()
        alone = model.score_user(history, candidates, order_seed=(user + 1) * 1000003 + 2 + user)
        assert torch.allclose(scores[8 * user:8 * user + 8], alone, atol=1e-5)
    one_user = Interaction({k: v[:1] for k, v in rows.items()})
    with pytest.raises(FullSortTooLargeError, match="max_full_sort_items=5"):
        model.full_sort_predict(one_user)
    config["max_full_sort_items"] = 100
    full = model.full_sort_predict(one_user)  # every title scored, no candidate list in the prompt
    assert full.shape == (model.n_items,) and full[0] == -torch.inf
    assert torch.allclose(full[1:], model.score_user([1, 2], list(range(1, model.n_items)), listed=[]), atol=1e-5)


# --- end to end through the command -------------------------------------------------------------------------------
def _run(args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.run([sys.executable, str(REPO / "run_recbole_weaverec.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@needs_shared_data()
def test_end_to_end_llmrec_then_llmmerge_reusing_its_adapter(tmp_path, tiny_llm_folder):
    data = tmp_path / "data"
    write_slice(SHARED_DATA, "amazon-toys", data, n_users=60, seed=1)
    write_slice(SHARED_DATA, "amazon-beauty", data, n_users=60, seed=1)
    common = [f"--data_path={data}", f"--llm_path={tiny_llm_folder}", "--max_train_samples=6",
              "--eval_sample_users=4", "--show_progress=False", "--max_history=3", "--max_title_tokens=6"]
    out = _run(["--model=LLMRec", "--dataset=amazon-toys", *common], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "test result" in log and "ndcg@5" in log and "train loss" in log
    checkpoint = next((tmp_path / "saved").glob("LLMRec-*.pth"))
    state = torch.load(checkpoint, map_location="cpu")["state_dict"]  # weights_only loading
    assert state and all("lora_" in k for k in state)  # the frozen base model is not in the checkpoint
    adapter = next((tmp_path / "saved").glob("LLMRec-*/adapters/amazon-toys"))
    assert (adapter / "adapter_model.safetensors").is_file()

    out = _run(["--model=LLMMerge", "--dataset=amazon-toys", "--source_domains=[amazon-beauty]",
                "--merge_method=ties", f"--adapter_paths={{'amazon-toys': '{adapter}'}}", *common], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "training LoRA amazon-beauty" in log and "training LoRA amazon-toys" not in log  # target reused
    assert "merged 2 adapters (ties)" in log and "test result" in log
    assert next((tmp_path / "saved").glob("LLMMerge-*/adapters/amazon-beauty/adapter_config.json"))
