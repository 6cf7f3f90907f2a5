"""max_prompt_tokens (issue 16): an over-long prompt drops its oldest history items, whole, until it fits; the
candidates and the answer are never cut; training and scoring prompts are capped alike."""
import pytest
import torch

from conftest import write_tiny_dataset
from recbole_weaverec.config import ConfigError
from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
from recbole_weaverec.model.llm.prompts import IGNORE_INDEX, PromptBuilder
from recbole_weaverec.model.llm.samples import encode_sample
from recbole_weaverec.model.llm.training import training_key, LoraSettings
from recbole_weaverec.testing import tiny_llama

HISTORY = [f"Wooden toy number {i} with a rather long descriptive title" for i in range(30)]
CANDIDATES = ["Board game of strategy", "Blue puzzle cube", "Remote control racing car", "Dollhouse furniture kit"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(embedded_folder()))


def test_over_long_history_is_trimmed_oldest_first_to_fit_and_candidates_stay(tokenizer):
    free = PromptBuilder(tokenizer, 50, 16, True)
    full = free.prompt_ids(HISTORY, CANDIDATES)
    cap = len(full) - 100
    capped = PromptBuilder(tokenizer, 50, 16, True, max_prompt_tokens=cap)
    ids = capped.prompt_ids(HISTORY, CANDIDATES)
    assert len(ids) <= cap < len(full)
    # the kept history is the newest suffix, and the longest that fits
    k = next(k for k in range(1, len(HISTORY)) if free.prompt_ids(HISTORY[k:], CANDIDATES) == ids)
    assert len(free.prompt_ids(HISTORY[k - 1:], CANDIDATES)) > cap
    text = tokenizer.decode(ids)
    assert capped.truncate(HISTORY[-1]) in text and capped.truncate(HISTORY[0]) not in text
    assert all(c in text for c in CANDIDATES)  # every candidate whole
    # training: the answer follows the capped prompt whole and carries the loss
    seq, labels = capped.training_ids(HISTORY, CANDIDATES[0], CANDIDATES)
    answer = capped.answer_ids(CANDIDATES[0])
    assert seq == ids + answer and labels == [IGNORE_INDEX] * len(ids) + answer
    # a prompt within the cap is unchanged; no cap = the old prompt
    assert capped.prompt_ids(HISTORY[-3:], CANDIDATES) == free.prompt_ids(HISTORY[-3:], CANDIDATES)
    # a cap the candidate list alone exceeds is refused (never a cut candidate)
    bare = len(free.prompt_ids([], CANDIDATES))
    with pytest.raises(ConfigError, match=f"max_prompt_tokens={bare - 1} is too small"):
        PromptBuilder(tokenizer, 50, 16, True, max_prompt_tokens=bare - 1).prompt_ids(HISTORY, CANDIDATES)
    # the cap is part of the training key only when set (keys of existing adapters stay valid)
    s = LoraSettings()
    assert "max_prompt_tokens" not in training_key("m", {"d": 1}, s, free, 30)["prompt"]
    assert training_key("m", {"d": 1}, s, capped, 30)["prompt"]["max_prompt_tokens"] == cap


def test_llm_model_caps_training_and_scoring_prompts(tmp_path, tokenizer, monkeypatch):
    from recbole_weaverec.model.llm import base
    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.quick_start import build_config, prepare

    folder = tmp_path / "llm"
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_tiny_dataset(tmp_path / "data", n_users=20, seq_len=(12, 16))
    common = {"data_path": str(data), "llm_path": str(folder), "max_history": 50, "max_title_tokens": 16,
              "max_train_samples": 8, "num_prompt_candidates": 6, "show_progress": False, "lora_r": 4,
              "lora_alpha": 8}
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        build_config("LLMRec", "tiny", config_dict={**common, "max_prompt_tokens": 0})
    config = build_config("LLMRec", "tiny", config_dict={**common, "max_prompt_tokens": 140})
    _, train, _, test = prepare(config)
    model = LLMRec(config, train._dataset)
    uncapped = PromptBuilder(tokenizer, 50, 16, True)
    lengths = []
    for sample in model.training_samples():
        seq, labels = encode_sample(sample, model.builder, model.domains)
        answer = sum(t != IGNORE_INDEX for t in labels)
        lengths.append(len(seq) - answer)
        assert labels[-answer:] == model.builder.answer_ids(model.target.titles[sample.target])
    full = [len(encode_sample(s, uncapped, model.domains)[0]) for s in model.training_samples()]
    assert max(lengths) <= 140 < max(full)  # the data has prompts over the cap, and none is left
    seen = []
    real = base.score_candidates
    monkeypatch.setattr(base, "score_candidates", lambda llm, prompt, answers, *a, **k:
                        seen.append((len(prompt), len(answers))) or real(llm, prompt, answers, *a, **k))
    history = list(range(1, 16))
    scores = model.score_user(history, list(range(1, 7)))
    assert seen == [(seen[0][0], 6)] and seen[0][0] <= 140 and scores.shape == (6,)
    assert len(uncapped.prompt_ids(model._titles(history), model._titles(range(1, 7)))) > 140
    assert torch.isfinite(scores).all()
