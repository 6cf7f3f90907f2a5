"""``eval_step: 0`` means no validation in RecBole's ``fit`` (the last epoch is kept): the LLM models honour it too,
also when they have nothing left to train (LLMMerge, a reused adapter), and still evaluate the test split."""
import pytest

import test_domains
from conftest import write_tiny_dataset

tiny_llm = test_domains.tiny_llm  # the same fixture

SMALL = {"max_train_samples": 4, "max_history": 3, "max_title_tokens": 5, "num_prompt_candidates": 6,
         "train_batch_size": 4, "eval_sample_users": 3, "show_progress": False, "lora_r": 4, "lora_alpha": 8,
         "lora_dropout": 0.0, "eval_mode": "uni29", "epochs": 1}


@pytest.fixture()
def domains(tmp_path):
    write_tiny_dataset(tmp_path, name="shop", seed=1)
    write_tiny_dataset(tmp_path, name="other", seed=2)
    return tmp_path


@pytest.mark.parametrize("model, extra", [
    ("LLMRec", {}), ("LLMMerge", {"source_domains": ["other"]}),
    ("WeaveRec", {"source_domains": ["other"], "weave_target_samples": 4, "weave_source_samples": 3})])
@pytest.mark.parametrize("eval_step", [0, 1])
def test_eval_step_0_skips_validation_and_still_tests(domains, tiny_llm, tmp_path, monkeypatch, model, extra,
                                                      eval_step):
    from recbole_weaverec.model.llm.trainer import LLMTrainer
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    validations = []
    valid_epoch = LLMTrainer._valid_epoch

    def counting(self, *args, **kwargs):
        validations.append(1)
        return valid_epoch(self, *args, **kwargs)

    monkeypatch.setattr(LLMTrainer, "_valid_epoch", counting)
    out = run(model, "shop", config_dict={"data_path": str(domains), "llm_path": tiny_llm, "eval_step": eval_step,
                                          "checkpoint_dir": str(tmp_path / "saved"), **SMALL, **extra})
    assert len(validations) == (0 if eval_step == 0 else 1)
    assert 0.0 <= out["test_result"]["ndcg@5"] <= 1.0
