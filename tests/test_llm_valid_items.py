"""``train_valid_items`` (issue 16.4, the reference's training data): every domain a module trains on also gives one
prompt per user whose answer is the user's validation item (RecBole's valid split), before its sampled training
prefixes; off by default, and then nothing changes (samples, adapter keys)."""
import pytest

import test_domains
from conftest import write_tiny_dataset

tiny_llm = test_domains.tiny_llm  # the same fixture

SMALL = {"max_train_samples": 6, "weave_target_samples": 5, "weave_source_samples": 3, "max_history": 3,
         "max_title_tokens": 5, "num_prompt_candidates": 6, "train_batch_size": 4, "eval_sample_users": 4,
         "show_progress": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.01,
         "eval_mode": "uni29", "epochs": 1}


@pytest.fixture()
def shop(tmp_path):
    write_tiny_dataset(tmp_path, name="shop", seed=1)
    write_tiny_dataset(tmp_path, name="other", seed=2)
    return tmp_path


def _splits(root, name="shop"):
    from recbole_weaverec.data.crossdomain import load_domain
    from recbole_weaverec.quick_start import build_config

    config = build_config("LLMRec", name, config_dict={"data_path": str(root), **SMALL})
    _, dataset, (train, valid, _) = load_domain(config, name)
    return dataset, train, valid


def _user_transitions(split):
    """{user id: (history, target)} of a sequential split."""
    c = split.config
    feat = split.inter_feat
    seqs, lens = feat[c["ITEM_ID_FIELD"] + c["LIST_SUFFIX"]].numpy(), feat[c["ITEM_LIST_LENGTH_FIELD"]].numpy()
    users, targets = feat[split.uid_field].numpy(), feat[split.iid_field].numpy()
    return {int(u): (tuple(int(i) for i in s[:n]), int(t)) for u, s, n, t in zip(users, seqs, lens, targets)}


def test_validation_transitions_come_first_and_the_sampled_prefixes_are_unchanged(shop):
    from recbole_weaverec.model.llm.samples import build_samples, domain_data

    dataset, train, valid = _splits(shop)
    plain = domain_data("shop", dataset, train)
    with_valid = domain_data("shop", dataset, train, valid_split=valid)
    before = build_samples(plain, 6, num_candidates=0, seed=3)
    after = build_samples(with_valid, 6, num_candidates=0, seed=3)
    users = _user_transitions(valid)
    assert len(after) == len(users) + len(before)
    # one sample per user answering that user's validation item from the user's whole training history
    assert {(s.history, s.target) for s in after[:len(users)]} == set(users.values())
    # the sampled training prefixes are the same ones (same seeded choice; without candidates nothing else is drawn)
    assert [(s.history, s.target) for s in after[len(users):]] == [(s.history, s.target) for s in before]
    # the validation items are not training targets: the split holds them out
    train_pairs = set(_user_transitions(train).values())
    assert not set(users.values()) & train_pairs


def test_the_option_is_in_the_adapter_key_only_when_on():
    from types import SimpleNamespace

    from recbole_weaverec.model.llm.training import LoraSettings, training_key

    builder = SimpleNamespace(max_history=5, max_title_tokens=10, prompt_candidates=False, max_prompt_tokens=None)
    off = training_key("m", {"d": 8}, LoraSettings(), builder, 0)
    on = training_key("m", {"d": 8}, LoraSettings(valid_items=True), builder, 0)
    assert "valid_items" not in off["settings"]  # keys of adapters trained before the option existed are unchanged
    assert on["settings"]["valid_items"] is True and on != off


@pytest.mark.parametrize("model", ["LLMRec", "WeaveRec"])
def test_models_train_on_each_domains_validation_items(shop, tiny_llm, tmp_path, monkeypatch, model):
    """End to end: the prompts trained on hold every target user's validation transition (and, for WeaveRec's
    hybrid, every source user's too); the run evaluates as usual."""
    from recbole_weaverec.model.llm import training
    from recbole_weaverec.quick_start import run

    seen, encode = [], training.encode_sample

    def recording(sample, builder, domains):
        seen.append((sample.domain, sample.history, sample.target))
        return encode(sample, builder, domains)

    monkeypatch.setattr(training, "encode_sample", recording)
    monkeypatch.chdir(tmp_path)
    extra = {"source_domains": ["other"]} if model == "WeaveRec" else {}
    out = run(model, "shop", config_dict={"data_path": str(shop), "llm_path": tiny_llm, "train_valid_items": True,
                                          "adapter_dir": str(tmp_path / "adapters"), **SMALL, **extra})
    assert 0 <= out["test_result"]["ndcg@5"] <= 1
    for name in ["shop"] + (["other"] if model == "WeaveRec" else []):
        _, _, valid = _splits(shop, name)
        wanted = {(name, h, t) for h, t in _user_transitions(valid).values()}
        assert wanted <= set(seen), (name, len(wanted - set(seen)))


def test_off_by_default(shop):
    from recbole_weaverec.quick_start import build_config

    assert build_config("LLMRec", "shop", config_dict={"data_path": str(shop)})["train_valid_items"] is False
