"""A corrupt cache is named in one line and rebuilt (or refused), never failing every run (issue 12, item 5):
L3AE's text embeddings and MergeRec's per-domain models."""
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from recbole_weaverec import textembed
from recbole_weaverec.errors import CacheFileError, ConfigError
from recbole_weaverec.model.twotower import domains

from conftest import write_tiny_dataset
from test_twotower import make_tiny_encoder

TEXTS = ["title: red car brand: Toyco", "title: blue boat", "title: green plane", ""]


def random_bytes(path):
    path.write_bytes(os.urandom(max(path.stat().st_size, 64)))


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def empty(path):
    path.write_bytes(b"")


def tensor_bytes_overwritten(path):
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header:] = b"\xff" * (len(data) - header)  # a valid header, the tensor bytes NaN (0xffffffff)
    path.write_bytes(bytes(data))


CORRUPTIONS = [random_bytes, cut_in_half, empty]


def warnings_about(caplog, path):
    found = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(path) in r.getMessage()]
    assert all("\n" not in m for m in found)
    return found


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny-bert")


# ------------------------------------------------------------------------------------------ text embeddings
@pytest.fixture
def embed(encoder, tmp_path, monkeypatch):
    """encode_texts on TEXTS with a cache in tmp; counts encoder loads."""
    loads = []
    real = textembed.load_encoder
    monkeypatch.setattr(textembed, "load_encoder", lambda *a: loads.append(a) or real(*a))
    cache = tmp_path / "emb"

    def call(texts=TEXTS):
        return textembed.encode_texts(texts, encoder_path=encoder, cache_dir=cache, cache_key="tiny.title",
                                      progress=False, device="cpu")
    call.loads, call.cache = loads, cache
    return call


@pytest.mark.parametrize("corrupt", [*CORRUPTIONS, tensor_bytes_overwritten])
def test_corrupt_embedding_cache_is_named_and_rebuilt(embed, corrupt, caplog):
    fresh = embed()
    (path,) = embed.cache.glob("*.safetensors")
    corrupt(path)
    with caplog.at_level(logging.WARNING):
        again = embed()
    (msg,) = warnings_about(caplog, path)
    assert "corrupt" in msg and "again" in msg
    assert torch.allclose(again, fresh) and len(embed.loads) == 2
    assert torch.equal(load_file(str(path))["embeddings"], again)  # overwritten with a good file
    assert sorted(p.name for p in embed.cache.iterdir()) == [path.name]  # no temp file left
    caplog.clear()
    embed()
    assert len(embed.loads) == 2 and not warnings_about(caplog, path)  # the next run reuses it quietly


@pytest.mark.parametrize("tensors", [{"embeddings": torch.zeros(3, 32)}, {"other": torch.zeros(4, 32)},
                                     {"embeddings": torch.zeros(4, 32, dtype=torch.float16)}],
                         ids=["rows", "key", "dtype"])
def test_embedding_cache_of_another_shape_is_rebuilt(embed, tensors, caplog):
    embed()
    (path,) = embed.cache.glob("*.safetensors")
    save_file(tensors, str(path))
    with caplog.at_level(logging.WARNING):
        emb = embed()
    assert emb.shape == (4, 32) and len(embed.loads) == 2
    assert warnings_about(caplog, path)


def test_l3ae_run_survives_a_corrupt_cache(tmp_path, encoder, monkeypatch, caplog):
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    data = write_tiny_dataset(tmp_path / "data")
    config = {"data_path": str(data), "text_encoder_path": encoder, "text_cache_dir": str(tmp_path / "emb"),
              "state": "WARNING", "show_progress": False}
    first = run("L3AE", "tiny", config_dict=config)
    (path,) = (tmp_path / "emb").glob("*.safetensors")
    cut_in_half(path)
    with caplog.at_level(logging.WARNING):
        second = run("L3AE", "tiny", config_dict=config)
    assert second["test_result"] == first["test_result"]
    assert warnings_about(caplog, path)


# ------------------------------------------------------------------------------------ MergeRec domain models
def small_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"embeddings.weight": torch.randn(10, 4, generator=g), "layer.0.weight": torch.randn(4, 4, generator=g)}


META = {"domain": "ta", "encoder": "tiny", "model_type": "bert", "vocab_size": "10", "hidden_size": "4",
        "num_layers": "1", "tokenizer_vocab": "abc"}


@pytest.mark.parametrize("corrupt", CORRUPTIONS)
def test_load_domain_model_names_a_corrupt_file(tmp_path, corrupt):
    path = tmp_path / "ta.safetensors"
    domains.save_domain_model(path, small_state(), META)
    assert torch.equal(domains.load_domain_model(path)[0]["layer.0.weight"], small_state()["layer.0.weight"])
    corrupt(path)
    with pytest.raises(CacheFileError) as e:
        domains.load_domain_model(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, ConfigError)


@pytest.mark.parametrize("state, meta, words", [
    (small_state(), {"domain": "ta"}, "lacks the metadata"),
    ({"w": torch.tensor([1.0, float("nan")])}, META, "non-finite"),
], ids=["metadata", "nan"])
def test_load_domain_model_refuses_foreign_content(tmp_path, state, meta, words):
    path = tmp_path / "ta.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CacheFileError, match=words):
        domains.load_domain_model(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("corrupt-mergerec")
    write_tiny_dataset(root / "data", "ta", seed=0, n_items=25)
    write_tiny_dataset(root / "data", "tb", seed=1, n_items=30)
    return root


@pytest.fixture
def merge(world, encoder, tmp_path, monkeypatch):
    """domain_models(...) of a MergeRec config over ta, tb, with fine-tuning replaced by a recorded stand-in."""
    from recbole_weaverec.model.twotower import mergerec  # noqa: F401  (imported before the patches below, so
    from recbole_weaverec.quick_start import build_config  # its from-imports keep the real functions)

    tuned = []

    class Tuned:  # what finetune_domain returns, as far as domain_models looks at it
        def __init__(self, name):
            self.tower = type("Tower", (), {"encoder": type("E", (), {"state_dict": lambda _: small_state()})()})()
            self.name = name

    monkeypatch.setattr(domains, "finetune_domain", lambda dconfig, *_: tuned.append(dconfig["dataset"])
                        or Tuned(dconfig["dataset"]))
    monkeypatch.setattr(domains, "encoder_meta", lambda model, name: {**META, "domain": name})

    def call(**kw):
        cfg = {"data_path": str(world / "data"), "text_encoder_path": encoder, "merge_domains": ["ta", "tb"],
               "merge_cache_dir": str(tmp_path / "cache"), "state": "WARNING", "show_progress": False, **kw}
        config = build_config("MergeRec", "ta", config_dict=cfg)
        return domains.domain_models(config, domains.text_config(config), ["ta", "tb"])
    call.tuned, call.cache = tuned, tmp_path / "cache"
    return call


@pytest.mark.parametrize("corrupt", [random_bytes, cut_in_half])
def test_corrupt_cached_domain_model_is_named_and_rebuilt(merge, corrupt, caplog):
    merge()
    assert merge.tuned == ["ta", "tb"]
    (path,) = merge.cache.glob("ta-*.safetensors")
    corrupt(path)
    with caplog.at_level(logging.WARNING):
        out = merge()
    assert merge.tuned == ["ta", "tb", "ta"]  # only the corrupt one is fine-tuned again
    (msg,) = warnings_about(caplog, path)
    assert "domain ta" in msg and "unreadable" in msg and "fine-tuning it again" in msg
    assert torch.equal(out["ta"][0]["layer.0.weight"], small_state()["layer.0.weight"])
    assert domains.load_domain_model(path)[1]["domain"] == "ta"  # overwritten with a good file
    assert not [p for p in merge.cache.iterdir() if ".tmp" in p.name]
    merge()
    assert merge.tuned == ["ta", "tb", "ta"]  # and reused by the next run


def test_corrupt_domain_model_given_as_a_file_is_refused(merge, tmp_path):
    given = tmp_path / "mine.safetensors"
    given.write_bytes(b"not a model")
    with pytest.raises(CacheFileError) as e:
        merge(merge_finetuned={"ta": str(given)})
    msg = str(e.value)
    assert str(given) in msg and "merge_finetuned['ta']" in msg and "\n" not in msg
    assert "ta" not in merge.tuned and given.read_bytes() == b"not a model"  # the user's file is not touched


def test_corrupt_domain_model_without_merge_finetune_is_refused(merge):
    merge()
    (path,) = merge.cache.glob("tb-*.safetensors")
    cut_in_half(path)
    with pytest.raises(CacheFileError) as e:
        merge(merge_finetune=False)
    assert str(path) in str(e.value) and "merge_finetune" in str(e.value) and "\n" not in str(e.value)
