"""``epochs: 0`` on LLMRec: the embedded LM as it is, the untrained start the board shows beside the trained row.
It must be the trained pipeline minus the training step: same prompts, candidates and scoring, no adapter saved."""
import pytest

import test_domains
from conftest import write_tiny_dataset

tiny_llm = test_domains.tiny_llm  # the same fixture

SMALL = {"max_train_samples": 4, "max_history": 3, "max_title_tokens": 5, "train_batch_size": 4,
         "eval_sample_users": 8, "show_progress": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
         "eval_mode": "uni29", "eval_step": 0, "prompt_candidates": False}


@pytest.fixture()
def shop(tmp_path):
    write_tiny_dataset(tmp_path, name="shop", seed=1)
    write_tiny_dataset(tmp_path, name="other", seed=2)
    return tmp_path


def _run(model, shop, tiny_llm, saved, **extra):
    from recbole_weaverec.quick_start import run

    return run(model, "shop", per_user=True, config_dict={"data_path": str(shop), "llm_path": tiny_llm,
                                                          "checkpoint_dir": str(saved), **SMALL, **extra})


def test_epochs_0_is_the_trained_pipeline_without_its_training_step(shop, tiny_llm, tmp_path, monkeypatch):
    from recbole_weaverec.model.llm.training import LoraLearner

    monkeypatch.chdir(tmp_path)
    steps = []
    monkeypatch.setattr(LoraLearner, "epoch", lambda self, *a, **k: steps.append(1) or 0.0)  # trains nothing
    zero = _run("LLMRec", shop, tiny_llm, tmp_path / "zero", epochs=0)
    assert steps == []  # no training epoch ran
    assert not list((tmp_path / "zero").glob("**/adapters/*"))  # and no (untrained) adapter was saved for reuse
    skipped = _run("LLMRec", shop, tiny_llm, tmp_path / "skipped", epochs=1)
    assert steps == [1]  # the contrast run went through its epoch (a no-op: its LoRA keeps B = 0)
    assert zero["test_per_user"]["users"] == skipped["test_per_user"]["users"]
    for metric, values in zero["test_per_user"]["metrics"].items():
        assert list(values) == list(skipped["test_per_user"]["metrics"][metric]), metric
    assert len(zero["test_per_user"]["users"]) == SMALL["eval_sample_users"]


def test_epochs_0_is_refused_where_modules_must_train(shop, tiny_llm, tmp_path, monkeypatch):
    from recbole_weaverec.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    for model in ("WeaveRec", "LLMMerge"):
        with pytest.raises(ConfigError, match="epochs=0 .*>= 1"):
            _run(model, shop, tiny_llm, tmp_path / "saved", epochs=0, source_domains=["other"])
