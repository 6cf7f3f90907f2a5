"""TextSeqRec: a text two-tower sequential model, with a tiny random BERT (real MiniLM tokenizer) on tiny data."""
import shutil

import pytest
import torch

from recbole_weaverec.config import ConfigError
from recbole_weaverec.data.itemtext import MissingTextFieldError
from recbole_weaverec.quick_start import build_config, prepare, run
from recbole_weaverec.textembed import default_encoder_path

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_tiny_encoder(folder, seed=0, vocab_size=None, dropout=0.1, init_range=0.02):
    """A randomly initialised 2-layer BERT (hidden 32) saved as an HF folder, with MiniLM's real tokenizer.

    ``init_range``: BERT's default 0.02 gives near-identical CLS outputs for every text (cosine ~1 - 1e-6); a wider
    range gives embeddings that differ, as a pretrained encoder's do."""
    from transformers import BertConfig, BertModel

    src = default_encoder_path()
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(f"{src}/{name}", folder / name)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size or 30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, initializer_range=init_range)
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
    bad = [({"pooling": "max"}, r"pooling='max' is not allowed: expected cls, mean or ~"),
           ({"max_attribute_tokens": 0}, r"max_attribute_tokens=0 is out of range: expected an integer >= 1"),
           ({"max_attribute_tokens": None, "max_item_tokens": None}, r"max_item_tokens=None and max_attribute_tokens"),
           ({"lr_schedule": "cosine"}, r"lr_schedule='cosine' is not allowed: expected one of linear, constant"),
           ({"warmup_ratio": 1.5}, r"warmup_ratio=1.5 is out of range: expected a number in \[0, 1\]"),
           ({"warmup_steps": -1}, r"warmup_steps=-1 is out of range: expected an integer >= 0"),
           ({"gradient_accumulation_steps": 0}, r"gradient_accumulation_steps=0 is out of range"),
           ({"max_train_samples": 0}, r"max_train_samples=0 is out of range: expected an integer >= 1"),
           ({"max_train_samples": "all"}, r"max_train_samples='all' is not allowed: expected an integer >= 1 or null")]
    for kw, message in bad:
        with pytest.raises(ConfigError, match=message) as e:
            build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, **kw))
        assert len(str(e.value).splitlines()) == 1


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
    untrained = run("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, epochs=0))  # the untrained start
    assert set(untrained["test_result"]) >= {"recall@10", "ndcg@10"} and untrained["test_result"] != result["test_result"]


def test_zero_epochs_evaluates_the_untouched_encoder(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer

    config, model, (train, valid, test) = tiny_model(tiny_data, tiny_encoder, epochs=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = TextSeqRecTrainer(config, model)
    trainer.fit(train, valid, saved=True)
    for p in model.parameters():
        p.data.add_(1.0)  # evaluate() must load the saved checkpoint: the untouched weights
    result = trainer.evaluate(test, load_best_model=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert 0.0 <= result["ndcg@10"] <= 1.0


# ---- fidelity options (MergeRec authors' code): pooling, per-attribute cut, schedule, accumulation, evaluation ----
def tiny_model(data, encoder, **kw):
    config = build_config("TextSeqRec", "tiny", config_dict=fast(data, encoder, **kw))
    dataset, train, valid, test = prepare(config)
    return config, config.model_class(config, train._dataset), (train, valid, test)


def test_pooling_cls_takes_position_0_and_differs_from_mean(tiny_data, tiny_encoder, run_dir):
    import torch.nn.functional as F

    from recbole_weaverec.model.twotower.encoder import default_pooling

    assert default_pooling(default_encoder_path()) == "mean"  # the embedded MiniLM is a mean-pooling encoder
    _, auto, _ = tiny_model(tiny_data, tiny_encoder)
    assert auto.tower.pooling == "cls"  # a plain BERT folder: cls, as the official code
    _, cls, _ = tiny_model(tiny_data, tiny_encoder, pooling="cls")
    _, mean, _ = tiny_model(tiny_data, tiny_encoder, pooling="mean")
    cls.eval()
    mean.eval()
    items = [1, 2, 3, 4]
    with torch.no_grad():
        a, b = cls.item_embeddings(items), mean.item_embeddings(items)
        inputs = cls.tower.item_inputs(items)
        batch = cls.tower.tokenizer.pad({"input_ids": inputs}, return_tensors="pt")
        hidden = cls.tower.encoder(**batch).last_hidden_state
    assert all(ids[0] == cls.tower.tokenizer.cls_token_id for ids in inputs)
    assert torch.allclose(a, F.normalize(hidden[:, 0], dim=-1), atol=1e-6)
    assert (a - b).norm(dim=-1).min() > 1e-2  # same weights, same inputs: the pooling alone differs


def test_per_attribute_cut_keeps_brand_and_category_behind_a_long_title(tmp_path, tiny_encoder, run_dir):
    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "d", name="tiny")
    item_file = data / "tiny" / "tiny.item"
    long_title = " ".join(["super"] * 40) + " widget"
    item_file.write_text(item_file.read_text().replace("Widget number 0 deluxe", long_title), encoding="utf-8")

    def text_of_i0(**kw):
        _, model, (train, _, _) = tiny_model(data, tiny_encoder, **kw)
        return model.tower.tokenizer.decode(model.tower.item_ids[train._dataset.token2id("item_id", "i0")])

    per_attribute = text_of_i0(max_attribute_tokens=4, max_item_tokens=None)
    assert per_attribute == "title : super super super super brand : brand0 category : toys games widgets"
    whole = text_of_i0(max_attribute_tokens=None, max_item_tokens=12)  # the old cut of the joined text
    assert whole.startswith("title : super") and "brand" not in whole and "category" not in whole


def lr_trace(trainer):
    seen = []
    step = trainer._optimizer_step

    def recording(scaler):
        seen.append(trainer.optimizer.param_groups[0]["lr"])  # the rate this update uses
        step(scaler)

    trainer._optimizer_step = recording
    return seen


def test_linear_schedule_warms_up_then_decays(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer

    config, model, (train, _, _) = tiny_model(tiny_data, tiny_encoder, epochs=2, warmup_ratio=0.3,
                                              gradient_accumulation_steps=2)
    trainer = TextSeqRecTrainer(config, model)
    lrs = lr_trace(trainer)
    trainer.fit(train, None, saved=False)
    total = trainer.planned_steps(train)
    assert len(lrs) == total == 2 * -(-len(train) // 2) and total >= 8  # one update per 2 micro-batches
    peak = max(range(total), key=lambda i: lrs[i])
    warmup = round(0.3 * total)
    assert peak == warmup and lrs[0] == 0.0 and lrs[peak] == pytest.approx(1e-3)
    assert all(x < y for x, y in zip(lrs[:peak], lrs[1:peak + 1]))  # warms up
    assert all(x > y for x, y in zip(lrs[peak:], lrs[peak + 1:])) and lrs[-1] < 0.25e-3  # decays towards 0
    config, model, _ = tiny_model(tiny_data, tiny_encoder, lr_schedule="constant")
    trainer = TextSeqRecTrainer(config, model)
    lrs = lr_trace(trainer)
    trainer.fit(train, None, saved=False)
    assert lrs and set(lrs) == {1e-3}
    config, model, _ = tiny_model(tiny_data, tiny_encoder, warmup_steps=3)  # an absolute count wins over the ratio
    assert TextSeqRecTrainer(config, model).warmup(100) == 3


def test_accumulating_k_micro_batches_equals_one_batch_of_k_times_the_size(tiny_data, tmp_path, run_dir):
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer

    encoder = make_tiny_encoder(tmp_path / "no-dropout", dropout=0.0)  # train() must not add noise
    # full softmax: each row's loss depends on its own row only, so the split cannot change the gradient
    kw = dict(softmax="full", learner="sgd", learning_rate=0.5, lr_schedule="constant", train_batch_size=12)
    config_k, model_k, (train, _, _) = tiny_model(tiny_data, encoder, gradient_accumulation_steps=3, **kw)
    config_1, model_1, _ = tiny_model(tiny_data, encoder, **kw)
    batch = next(iter(train))
    before = {k: v.clone() for k, v in model_1.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in model_k.state_dict().items())
    accumulating = TextSeqRecTrainer(config_k, model_k)
    accumulating._train_epoch([batch[0:4], batch[4:8], batch[8:12]], 0)
    TextSeqRecTrainer(config_1, model_1)._train_epoch([batch], 0)
    assert accumulating.optimizer_steps == 1
    moved = [k for k, v in model_1.state_dict().items() if not torch.equal(v, before[k])]
    assert any("encoder.layer.1" in k for k in moved)
    for k, v in model_1.state_dict().items():
        assert torch.allclose(model_k.state_dict()[k], v, atol=1e-6), k


def test_full_ranking_keeps_the_users_history_items(tiny_data, tiny_encoder, run_dir):
    """RecBole masks history items for general models only: a SEQUENTIAL model (TextSeqRec, MergeRec) ranks them, as
    the official MergeRec evaluator does; only the padding item is excluded."""
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer

    config, model, (_, _, test) = tiny_model(tiny_data, tiny_encoder, eval_mode="full")
    batch = next(iter(test))
    assert batch[1] is None  # no history index for sequential models
    trainer = TextSeqRecTrainer(config, model.eval())
    trainer.tot_item_num = model.n_items
    inter, scores, _, _ = trainer._full_sort_batch_eval(batch)
    seq = inter[model.ITEM_SEQ]
    history = scores.gather(1, seq)[seq > 0]
    assert torch.isfinite(history).all() and torch.isinf(scores[:, 0]).all()


# ---- efficiency: chunked evaluation, bf16 on CUDA only, item inputs without a sync per item -------------------
def test_full_ranking_scores_at_most_encode_batch_size_users_at_once(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer, UserChunks

    results, rows, scores = {}, {}, {}
    for chunk in (3, 1000):
        config, model, (_, _, test) = tiny_model(tiny_data, tiny_encoder, eval_mode="full", encode_batch_size=chunk)
        assert len(next(iter(test))[0]) > 3  # the loader's batch holds more users than a chunk
        predict = model.full_sort_predict
        rows[chunk], scores[chunk] = [], []

        def recorded(inter, chunk=chunk, predict=predict):
            rows[chunk].append(len(inter))
            out = predict(inter)
            scores[chunk].append(out.detach().reshape(len(inter), -1))
            return out

        model.full_sort_predict = recorded
        results[chunk] = TextSeqRecTrainer(config, model.eval()).evaluate(test, load_best_model=False)
        assert sum(len(b[0]) for b in UserChunks(test, chunk)) == len(test._dataset)  # every user once
        assert len(list(UserChunks(test, chunk))) == len(UserChunks(test, chunk))
    assert max(rows[3]) == 3 and sum(rows[3]) == sum(rows[1000]) and max(rows[1000]) > 3
    # the same users in the same order get the same scores: matmuls of other batch shapes round differently (an
    # untrained encoder's near-ties may then swap, so the metrics are compared loosely, the scores closely)
    assert torch.allclose(torch.cat(scores[3]), torch.cat(scores[1000]), atol=1e-4)
    assert results[3].keys() == results[1000].keys()


def test_bf16_autocast_on_cuda_only(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.encoder import autocast_dtype

    assert autocast_dtype("auto", "cuda") is torch.bfloat16 and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp32", "cuda") is None and autocast_dtype("bf16", "cpu") is torch.bfloat16
    embeddings = {}
    for precision in ("auto", "fp32", "bf16"):
        _, model, _ = tiny_model(tiny_data, tiny_encoder, precision=precision)
        with torch.no_grad():
            embeddings[precision] = model.eval().item_embeddings([1, 2, 3, 4])
    assert torch.equal(embeddings["auto"], embeddings["fp32"])  # CPU: the fp32 path, unchanged
    bf16 = embeddings["bf16"]  # the autocast path (as on a GPU), here on the CPU: fp32 out, close values
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, embeddings["fp32"])
    assert (bf16 * embeddings["fp32"]).sum(-1).min() > 0.99
    with pytest.raises(ConfigError, match="precision='fp16' is not allowed: expected one of auto, fp32, bf16"):
        build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder, precision="fp16"))


def test_bf16_enters_the_domain_model_cache_key_only_where_it_runs(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.domains import cache_key

    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder))
    keys = {}
    for precision, device in [("fp32", "cpu"), ("auto", "cpu"), ("bf16", "cpu"), ("auto", "cuda"), ("fp32", "cuda")]:
        config["precision"], config["device"] = precision, torch.device(device)
        keys[precision, device] = cache_key(config, tiny_encoder)
    assert keys["fp32", "cpu"] == keys["auto", "cpu"] == keys["fp32", "cuda"]  # fp32 runs: the key they had
    assert keys["bf16", "cpu"] == keys["auto", "cuda"] != keys["fp32", "cpu"]


def test_item_inputs_read_a_tensor_once_not_once_per_item(tiny_data, tiny_encoder, run_dir, monkeypatch):
    _, model, _ = tiny_model(tiny_data, tiny_encoder)
    items = torch.tensor([3, 1, 2, 3])
    expected = model.tower.item_inputs([3, 1, 2, 3])
    reads = []
    for name in ("__int__", "__index__", "item"):  # each is a device sync per element on a GPU tensor
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real: reads.append(1) or _real(self, *a))
    assert model.tower.item_inputs(items) == expected and reads == []


def _rows(loader):
    """The (user, target item) pairs of a training loader's split."""
    feat = loader._dataset.inter_feat
    ds = loader._dataset
    return sorted(zip(feat[ds.uid_field].tolist(), feat[ds.iid_field].tolist()))


def test_max_train_samples_trains_on_n_seeded_rows_of_the_split(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer, sample_training_rows

    config, model, (train, valid, _) = tiny_model(tiny_data, tiny_encoder, max_train_samples=7, lr_schedule="constant")
    full = _rows(train)
    assert len(full) > 7
    a, b = sample_training_rows(train, 7, 0), sample_training_rows(train, 7, 0)
    assert type(a) is type(train) and len(a._dataset) == 7 and _rows(a) == _rows(b)
    assert set(_rows(a)) <= set(full) and len(set(_rows(a))) == 7  # drawn without replacement from the split
    assert _rows(sample_training_rows(train, 7, 1)) != _rows(a)  # the seed chooses the rows
    assert sample_training_rows(train, None, 0) is train and sample_training_rows(train, len(full), 0) is train
    seen = []
    trainer = TextSeqRecTrainer(config, model)
    epoch = trainer._train_epoch
    trainer._train_epoch = lambda data, *args, **kw: (seen.append(_rows(data)), epoch(data, *args, **kw))[1]
    trainer.fit(train, None, saved=False)
    assert seen == [_rows(sample_training_rows(train, 7, config["seed"]))]  # fit trained on the seeded sample
    assert trainer.planned_steps(sample_training_rows(train, 7, 0)) == -(-7 // config["train_batch_size"])
    assert len(valid._dataset) == len(tiny_model(tiny_data, tiny_encoder)[2][1]._dataset)  # valid keeps every user


def test_max_train_samples_enters_the_domain_model_cache_key_only_when_set(tiny_data, tiny_encoder, run_dir):
    from recbole_weaverec.model.twotower.domains import cache_key

    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder))
    whole = cache_key(config, tiny_encoder)
    config["max_train_samples"] = 7
    seven = cache_key(config, tiny_encoder)
    config["max_train_samples"] = 8
    assert len({whole, seven, cache_key(config, tiny_encoder)}) == 3
    config["max_train_samples"] = None
    assert cache_key(config, tiny_encoder) == whole


def test_domain_model_cache_key_follows_contents_not_file_times(tiny_data, tiny_encoder, run_dir, tmp_path):
    import os
    import shutil

    from recbole_weaverec.model.twotower.domains import cache_key

    config = build_config("TextSeqRec", "tiny", config_dict=fast(tiny_data, tiny_encoder))
    key = cache_key(config, tiny_encoder)
    inter = os.path.join(config["data_path"], "tiny.inter")
    os.utime(inter, ns=(1, 1))  # a fresh copy of the same data (a new checkout, a re-mounted share)
    copy = shutil.copytree(tiny_encoder, tmp_path / "encoder copy")  # the same encoder in another folder
    assert cache_key(config, str(copy)) == key
    with open(inter, "a") as f:  # one more interaction: the domain model is trained again
        f.write("1\t2\t99\n")
    assert cache_key(config, tiny_encoder) != key
