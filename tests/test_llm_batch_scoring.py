"""Several users per scoring forward (issue 16.3, ``score_users_per_batch``): padded prompts and answer rows give the
single-user scores and rankings; the masks keep padding out of every real token's view."""
import pytest
import torch

from conftest import write_tiny_dataset
from recbole_weaverec.config import ConfigError
from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer
from recbole_weaverec.model.llm.prompts import PromptBuilder
from recbole_weaverec.model.llm.scoring import _batched_answers, packed_answers, score_candidates, score_users
from recbole_weaverec.testing import naive_scores, tiny_llama

TITLES = ["", "Red wooden toy train with four wagons", "Blue puzzle cube", "Plush teddy bear large",
          "Magnetic alphabet letters for kids", "Board game of strategy", "Watercolor paint set 24 colours",
          "Remote control racing car", "Dollhouse furniture kit", "Wooden stacking rings",
          "Glow in the dark stars ceiling stickers"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(embedded_folder()))


def users(tokenizer):
    """Seven users whose prompts (1 to 5 history titles, 2 to 8 listed candidates) and candidate counts differ, so
    every batch pads prompts and answer rows; one candidate is a one-token answer (no answer-row tokens)."""
    b = PromptBuilder(tokenizer, 5, 12, True)
    out = []
    for u in range(7):
        history = [TITLES[1 + (u + i) % 10] for i in range(1 + u % 5)]
        candidates = [1 + (3 * u + j) % 10 for j in range(2 + u)]
        prompt = b.prompt_ids(history, [TITLES[c] for c in candidates])
        answers = [b.answer_ids(TITLES[c]) for c in candidates]
        if u == 2:
            answers.append([tokenizer.eos_token_id])
        out.append((prompt, answers))
    assert len({len(p) for p, _ in out}) == len(out)
    return out


def sharp_llama(tokenizer):
    """A tiny random Llama with peaked attention: at the default init attention is nearly uniform, so a wrong
    position id moved a score by only ~5e-5; with queries and keys scaled up it moves scores by far more."""
    model = tiny_llama(tokenizer, seed=1)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_batched_users_score_like_one_user_at_a_time(tokenizer, attn):
    model = sharp_llama(tokenizer)
    model.config._attn_implementation = attn
    data = users(tokenizer)
    # the single-user path is itself right on this model (one full forward per candidate)
    assert torch.allclose(score_candidates(model, *data[2]), naive_scores(model, *data[2]), atol=1e-5)
    for chunk in (3, 64):  # 3: users run out of candidates at different chunks (empty rows)
        single = [score_candidates(model, p, a, chunk_size=chunk) for p, a in data]
        for per_batch in (1, 3, 4):
            batched = []
            for i in range(0, len(data), per_batch):
                batched += score_users(model, data[i:i + per_batch], chunk_size=chunk,
                                       pad_id=tokenizer.pad_token_id)
            diff = max(float((s - b).abs().max()) for s, b in zip(single, batched))
            print(f"{attn} chunk={chunk} B={per_batch}: max |Δ score| {diff:.2e}")
            assert diff <= 1e-5, (attn, chunk, per_batch, diff)
            for s, b in zip(single, batched):
                assert b.dtype == torch.float32 and b.shape == s.shape
                assert torch.equal(torch.argsort(s, descending=True), torch.argsort(b, descending=True))


def test_padding_tokens_are_outside_every_real_tokens_view():
    # user 0: prompt of 2 (columns 1-2 of width 3), answers [5,6,7] and [8]; user 1: prompt of 3, answer [9, 10]
    packed = [packed_answers([[5, 6, 7], [8]], 2, "cpu"), packed_answers([[9, 10]], 3, "cpu")]
    ids, positions, mask = _batched_answers(packed, torch.tensor([1, 0]), 3, 2, pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6], [9, 0]]
    assert positions[0].tolist() == [2, 3] and positions[1, 0].item() == 3  # right after each user's own prompt
    m = mask[:, 0].int().tolist()
    assert m[0] == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1]]  # the padded prompt column 0 is never seen
    assert m[1] == [[1, 1, 1, 1, 0], [0, 0, 0, 0, 1]]  # the padding token sees only itself


def test_model_scores_the_same_with_users_batched(tmp_path, tokenizer):
    from recbole.data.interaction import Interaction

    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.quick_start import build_config, prepare

    folder = tmp_path / "tinyllm"
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_tiny_dataset(tmp_path / "data", n_items=12)
    common = {"data_path": str(data), "llm_path": str(folder), "max_train_samples": 2, "show_progress": False,
              "max_full_sort_items": 100}
    with pytest.raises(ConfigError, match="score_users_per_batch"):
        LLMRec.validate_config(build_config("LLMRec", "tiny", config_dict={**common, "score_users_per_batch": 0}))
    config = build_config("LLMRec", "tiny", config_dict=common)
    assert config["score_users_per_batch"] == 1  # the default: one user at a time
    _, train_data, _, _ = prepare(config)
    model = LLMRec(config, train_data._dataset)
    cands = [[3, 1, 4, 5, 9], [7, 1, 2], [2, 8, 6, 4]]
    seq = torch.tensor([[1, 2, 0, 0], [4, 5, 6, 7], [9, 0, 0, 0]])
    lengths = [2, 4, 1]
    rows = {"user_id": torch.tensor([u + 1 for u, c in enumerate(cands) for _ in c]),
            "item_id": torch.tensor([i for c in cands for i in c]),
            "item_id_list": torch.cat([seq[u:u + 1].repeat(len(c), 1) for u, c in enumerate(cands)]),
            "item_length": torch.tensor([lengths[u] for u, c in enumerate(cands) for _ in c])}
    every = {"user_id": torch.tensor([1, 2, 3]), "item_id_list": seq, "item_length": torch.tensor(lengths)}
    one = model.predict(Interaction(rows))
    full_one = model.full_sort_predict(Interaction(every))
    config["score_users_per_batch"] = 2
    batched = model.predict(Interaction(rows))
    full_batched = model.full_sort_predict(Interaction(every))
    assert torch.allclose(one, batched, atol=1e-5)
    finite = torch.isfinite(full_one)
    assert torch.equal(finite, torch.isfinite(full_batched)) and finite.sum() == 3 * (model.n_items - 1)
    assert torch.allclose(full_one[finite], full_batched[finite], atol=1e-5)
