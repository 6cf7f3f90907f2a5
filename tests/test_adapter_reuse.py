"""An adapter LLMRec trains into ``adapter_dir`` is found there and reused by LLMMerge and WeaveRec when it was
trained with their settings, and refused (one line, nothing trained) when it was not (issue 16)."""
import json
import logging
from pathlib import Path

import pytest

from conftest import write_tiny_dataset
from recbole_weaverec.errors import AdapterMismatchError
from recbole_weaverec.model.llm import training
from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
from recbole_weaverec.model.llm.training import META_FILE
from recbole_weaverec.testing import tiny_llama

SMALL = {"max_train_samples": 6, "weave_target_samples": 4, "weave_source_samples": 3, "max_history": 3,
         "max_title_tokens": 5, "num_prompt_candidates": 6, "train_batch_size": 4, "eval_sample_users": 2,
         "show_progress": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 0.01,
         "weave_compare_target_only": False}


class FakeTrainer:
    def __init__(self, checkpoint_dir):
        self.checkpoint_dir = str(checkpoint_dir)
        self.weave_valid_data = None
        self.logger = logging.getLogger("test_adapter_reuse")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reuse")
    tokenizer = load_tokenizer(str(embedded_folder()))
    tiny_llama(tokenizer, seed=0).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    write_tiny_dataset(root / "data", "toys", n_users=30, n_items=20, seed=0)
    write_tiny_dataset(root / "data", "beauty", n_users=30, n_items=20, seed=1)
    return root


def build(model, world, adapters, **over):
    from recbole_weaverec.quick_start import build_config, prepare
    from recbole_weaverec.registry import get_model_class

    config = build_config(model, "toys", config_dict={"data_path": str(world / "data"), "llm_path": str(world / "llm"),
                                                      "source_domains": ["beauty"], "adapter_dir": str(adapters),
                                                      **SMALL, **over})
    _, train, _, _ = prepare(config)
    out = get_model_class(model)(config, train._dataset)
    out.adapter_root = Path(adapters)  # what LLMTrainer sets from adapter_dir
    return out


def test_llmrec_adapter_is_reused_by_llmmerge_and_weaverec_and_refused_with_other_settings(world, tmp_path,
                                                                                            monkeypatch):
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    adapters = tmp_path / "adapters"
    run("LLMRec", "toys", config_dict={"data_path": str(world / "data"), "llm_path": str(world / "llm"),
                                       "adapter_dir": str(adapters), **SMALL})
    theta0 = adapters / "toys"
    assert json.loads((theta0 / META_FILE).read_text())["key"]["domains"] == {"toys": SMALL["max_train_samples"]}
    weights = (theta0 / "adapter_model.safetensors").read_bytes()
    trained = []
    real = training.train_adapter
    monkeypatch.setattr(training, "train_adapter", lambda *a, **k: trained.append(Path(a[5]).name) or real(*a, **k))
    for model, other in (("WeaveRec", "toys~beauty"), ("LLMMerge", "beauty")):
        trained.clear()
        merged = build(model, world, adapters)
        merged.prepare(FakeTrainer(tmp_path / "ckpt"))
        assert trained == [other], model  # θ0 found and accepted, only the other module trained
        assert Path(merged.adapter_folders["toys"]) == theta0 and merged.folded
    assert (theta0 / "adapter_model.safetensors").read_bytes() == weights  # reused as it is
    # trained with other settings (here another number of training prompts): refused before anything trains
    trained.clear()
    for model in ("WeaveRec", "LLMMerge"):
        other = build(model, world, adapters, max_train_samples=SMALL["max_train_samples"] + 1)
        with pytest.raises(AdapterMismatchError, match=r"adapters/toys holds an adapter trained with other settings"):
            other.prepare(FakeTrainer(tmp_path / "ckpt"))
    assert not trained
    # a folder saved without its training key (LLMRec before this fix) is refused with the way to use it anyway
    meta = json.loads((theta0 / META_FILE).read_text())
    del meta["key"]
    (theta0 / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterMismatchError, match="saved without its training settings: pass it through adapter_"):
        build("LLMMerge", world, adapters).prepare(FakeTrainer(tmp_path / "ckpt"))
