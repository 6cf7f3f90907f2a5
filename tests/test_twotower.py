"""TextSeqRec: a text two-tower sequential model, with a tiny random BERT (real MiniLM tokenizer) on tiny data."""
import shutil

import pytest
import torch

from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.itemtext import MissingTextFieldError
from recbole_weaverec.quick_start import build_config, prepare, run
from recbole_weaverec.textembed import default_encoder_path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder(folder, seed=0, vocab_size=None):
    """A randomly initialised 2-layer BERT (hidden 32) saved as an HF folder, with MiniLM's real tokenizer."""
    from transformers import BertConfig, BertModel

    src = default_encoder_path()
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{src}/{name}", folder / name)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size or 30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


def fast(data, encoder, **kw):
    return {"data_path": str(data), "text_encoder_path": encoder, "epochs": 1, "train_batch_size": 16,
            "max_user_tokens": 48, "max_item_tokens": 16, "show_progress": False, "state": "WARNING",
            "learning_rate": 1e-3, **kw}


def test_user_text_is_most_recent_first_and_truncated(tiny_data, tiny_encoder, run_dir):
    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, max_seq_items=2,
                                                                 max_user_tokens=200))
    dataset, train, _, _ = prepare(config)
    model = config.model_class(config, train._dataset)
    tok = model.tower.tokenizer
    seq = torch.tensor([[3, 5, 7, 0]])
    ids = model.tower.user_inputs(seq, torch.tensor([3]))[0]
    text = tok.decode(ids, skip_special_tokens=True)
    texts = [tok.decode(model.tower.item_ids[i]) for i in (7, 5)]
    assert text == f"{texts[0]} ; {texts[1]}"  # item 7 (most recent) first, only 2 items, "; " between
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    short = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, max_user_tokens=10))
    m2 = short.model_class(short, train._dataset)
    assert len(m2.tower.user_inputs(seq, torch.tensor([3]))[0]) == 10


@pytest.mark.parametrize("mode,softmax", [("full", "in_batch"), ("uni29", "full")])
def test_training_changes_weights_and_evaluates(tiny_data, tiny_encoder, run_dir, mode, softmax):
    from recbole.trainer import Trainer

    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, eval_mode=mode,
                                                                 softmax=softmax, full_softmax_refresh=2))
    dataset, train, valid, test = prepare(config)
    model = config.model_class(config, train._dataset)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(config, model)
    trainer.fit(train, valid, saved=False, show_progress=False)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder.layer.0" in k for k in changed)
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert 0.0 <= result["ndcg@10"] <= 1.0 and 0.0 < result["recall@20"] <= 1.0
    assert config["eval_args"]["mode"]["test"] == mode


def test_item_cache_is_reused_and_invalidated(tiny_data, tiny_encoder, run_dir):
    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder))
    dataset, train, _, test = prepare(config)
    model = config.model_class(config, train._dataset).eval()
    calls = []
    original = model.all_item_embeddings
    model.all_item_embeddings = lambda *a, **k: calls.append(1) or original(*a, **k)
    batch = next(iter(test))[0]
    s1 = model.full_sort_predict(batch)
    model.full_sort_predict(batch)
    assert len(calls) == 1  # encoded once per evaluation
    model.train()
    model.calculate_loss(next(iter(train)))  # a training step: cache dropped
    model.eval()
    s2 = model.full_sort_predict(batch)
    assert len(calls) == 2 and torch.allclose(s1, s2)  # same weights (no optimizer step): same scores
    # sampled scoring agrees with full scoring for the same (user, item) pairs
    inter = batch.copy() if hasattr(batch, "copy") else batch
    items = torch.arange(1, 4).repeat(len(batch))[: len(batch)]
    inter.update(type(batch)({model.ITEM_ID: items}))
    assert torch.allclose(model.predict(inter), s1[torch.arange(len(batch)), items], atol=1e-5)


def test_cosine_scores_are_bounded_by_inverse_temperature(tiny_data, tiny_encoder, run_dir):
    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, temperature=0.5))
    _, train, _, test = prepare(config)
    model = config.model_class(config, train._dataset).eval()
    scores = model.full_sort_predict(next(iter(test))[0])
    assert scores.abs().max() <= 2.0 + 1e-5


def test_bad_config_values(tiny_data, tiny_encoder, run_dir):
    with pytest.raises(ConfigError, match="softmax"):
        build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, softmax="sampled"))
    with pytest.raises(ConfigError, match="temperature"):
        build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, temperature=0))
    with pytest.raises(ConfigError, match="max_user_tokens"):
        build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, max_user_tokens=0))


def test_items_without_text_fields_are_named(tmp_path, tiny_encoder, run_dir):
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "d", name="notext", titles=False)
    config = build_config("TextSeqRec", "notext", config_dict=fast(data, tiny_encoder, text_fields=["title"],
                                                                   load_col={"inter": ["user_id", "item_id",
                                                                                       "timestamp"],
                                                                             "item": ["item_id", "brand"]}))
    _, train, _, _ = prepare(config)
    with pytest.raises(MissingTextFieldError, match="notext.*title"):
        config.model_class(config, train._dataset)


def test_run_end_to_end(tiny_data, tiny_encoder, run_dir):
    result = run("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder))
    assert set(result["test_result"]) >= {"recall@10", "ndcg@10"}
