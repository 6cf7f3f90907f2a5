"""``llm_eval: generate`` (issue 16.4): the reference's protocol (greedy answer, split on '||', exact title match,
NDCG@k = 1/log2(j+2) at the truth's first position j) computed by RecBole's own evaluator."""
import math
import re

import pytest
import torch

from conftest import write_tiny_dataset
from recbole_weaverec.errors import ConfigError
from recbole_weaverec.model.llm import generation
from recbole_weaverec.model.llm.generation import NON_CANDIDATE, as_generated_ranking, match_scores, split_answer

N_USERS, N_ITEMS, SEQ = 30, 60, 6
SMALL = {"max_train_samples": 6, "max_history": 10, "max_title_tokens": 5, "num_prompt_candidates": 6,
         "train_batch_size": 4, "show_progress": False, "lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01,
         "eval_mode": "uni29"}


def raw_title(i):
    return f"Item {i:02d} wooden puzzle box for kids"  # cut to "Item 07 wooden" at max_title_tokens=5


def user_items(u):
    return [(u + 11 * t) % N_ITEMS for t in range(SEQ)]  # distinct first items: every history is unique


def write_shop(root):
    """60 items (enough non-candidate items beside uni29's 30), 30 users with 6 items each, titles unique after
    truncation."""
    out = root / "shop"
    out.mkdir(parents=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    rows += [f"u{u}\ti{i}\t{t + 1}" for u in range(N_USERS) for t, i in enumerate(user_items(u))]
    (out / "shop.inter").write_text("\n".join(rows) + "\n")
    items = ["item_id:token\ttitle:token_seq"] + [f"i{i}\t{raw_title(i)}" for i in range(N_ITEMS)]
    (out / "shop.item").write_text("\n".join(items) + "\n")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    from recbole_weaverec.model.llm.backbone import embedded_folder, load_tokenizer

    return load_tokenizer(str(embedded_folder()))


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, tokenizer):
    from recbole_weaverec.testing import tiny_llama

    folder = tmp_path_factory.mktemp("tinyllm")
    tiny_llama(tokenizer, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def shop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return write_shop(tmp_path / "data")


# --- 1. parsing and matching --------------------------------------------------------------------------------------
def test_answer_parts_keep_their_generated_positions():
    parts = split_answer("A title||B title\nC|| ||A title\n\nnot listed||B")
    # an empty part between two '||' stays (the reference keeps it); the empty line a newline makes does not
    assert parts == ["A title", "B title", "C", "", "A title", "not listed", "B"]
    titles = ["C", "A title", "Z", " B title", "A", "B"]
    scores = match_scores(parts, titles)
    # first occurrence wins (A title at 0, not 4); exact match only ("A" is not "A title"); "not listed" matches
    # nothing but keeps position 5, so "B" is at 6 (positions as generated: the reference counts them so)
    assert scores.tolist() == [-2.0, 0.0, -math.inf, -1.0, -math.inf, -6.0]
    assert split_answer("A || B") == ["A", "B"] and split_answer("") == [""]


def test_unmatched_positions_go_to_non_candidate_items():
    """Row 0: candidates 1..4; 2 generated at 0, 3 at 2 (position 1 was a part no candidate matched). Row 1:
    nothing generated matched. RecBole's topk then ranks 3 at 2 and never ranks an unmatched candidate in the
    top k."""
    inf = math.inf
    scores = torch.full((2, 10), -inf)
    scores[0, 1:5] = torch.tensor([-inf, 0.0, -2.0, -inf])
    listed = torch.zeros(2, 10, dtype=torch.bool)
    listed[:, 1:5] = True
    out = as_generated_ranking(scores, listed, 3)
    low = torch.tensor(NON_CANDIDATE).item()  # as float32 holds it
    assert out[0].tolist() == [-1.0, -inf, 0.0, -2.0, -inf] + [low] * 5
    assert out[1].tolist() == [0.0, -inf, -inf, -inf, -inf, -1.0, -2.0] + [low] * 3
    top = torch.topk(out, 3).indices
    assert top[0].tolist() == [2, 0, 3] and not set(top[1].tolist()) & {1, 2, 3, 4}


# --- 2. RecBole's metrics equal the reference formula -------------------------------------------------------------
PLANS = ["T||c||c||c||c",  # truth at 0
         "c||no such product||T||c",  # at 2, after a part that matches no candidate
         "c\nc||T",  # at 2, after a repeated title (split on the newline as well)
         "c||c||c||c||c",  # not generated
         "c||c",  # a short list without the truth
         "c||c||c||c||T",  # at 4
         "c||c||c||c||c||T"]  # at 5: beyond top 5
POSITIONS = [0, 2, 2, None, None, 4, 5]


def reference(j):
    """WeaveRec's metrics for a truth first generated at position j (None: not generated)."""
    ndcg = {k: 1 / math.log2(j + 2) if j is not None and j < k else 0.0 for k in (1, 3, 5)}
    hit = j is not None and j < 5
    return {"ndcg@1": ndcg[1], "ndcg@3": ndcg[3], "ndcg@5": ndcg[5], "mrr@5": 1 / (j + 1) if hit else 0.0,
            "hit@5": float(hit)}


def test_generate_metrics_equal_the_reference_formula(shop, tiny_llm, tokenizer, monkeypatch):
    from recbole_weaverec.model.llm.prompts import SEPARATOR, PromptBuilder
    from recbole_weaverec.quick_start import run

    builder = PromptBuilder(tokenizer, max_title_tokens=SMALL["max_title_tokens"])
    rendered = [builder.truncate(raw_title(i)) for i in range(N_ITEMS)]
    assert len(set(rendered)) == N_ITEMS  # no two candidates tie (the one case that cannot be exact)
    truths = {}  # the prompt's history -> (user, rendered truth): valid (4 items) and test (5 items) prompts
    for u in range(N_USERS):
        items = user_items(u)
        for n in (SEQ - 2, SEQ - 1):
            truths[SEPARATOR.join(rendered[i] for i in items[:n])] = (u, rendered[items[n]])
    calls = []

    def planted(model, tok, prompt_ids, max_new_tokens, stop_ids):
        text = tok.decode(prompt_ids)
        history = re.search(r"oldest first: \[(.*?)\]\.", text).group(1)
        listed = re.search(r"among these candidates: \[(.*?)\]\.", text).group(1).split(SEPARATOR)
        u, truth = truths[history]
        others = iter([t for t in listed if t != truth])
        plan = PLANS[u % len(PLANS)]
        assert truth in listed and max_new_tokens == 5 * (SMALL["max_title_tokens"] + 4)
        calls.append(u)
        return re.sub(r"\b[cT]\b", lambda m: truth if m.group() == "T" else next(others), plan)

    monkeypatch.setattr(generation, "generate_text", planted)
    out = run("LLMRec", "shop", config_dict={"data_path": str(shop), "llm_path": tiny_llm, "llm_eval": "generate",
                                             "eval_sample_users": None, **SMALL}, per_user=True)
    assert sorted(calls) == sorted(list(range(N_USERS)) * 2)  # valid + test, one generate call per user each
    users = [int(t[1:]) for t in out["test_per_user"]["users"]]
    values = out["test_per_user"]["metrics"]
    assert len(users) == N_USERS
    for metric in ("ndcg@1", "ndcg@3", "ndcg@5", "mrr@5", "hit@5"):
        expected = torch.tensor([reference(POSITIONS[u % len(PLANS)])[metric] for u in users], dtype=torch.float64)
        got = torch.as_tensor(values[metric], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), metric
        assert abs(out["test_result"][metric] - float(expected.mean())) < 1e-4, metric
    absent = [n for n, u in enumerate(users) if POSITIONS[u % len(PLANS)] in (None, 5)]
    assert absent and all(values[m][n] == 0 for n in absent for m in ("ndcg@1", "ndcg@3", "ndcg@5", "mrr@5"))


# --- 3. a real greedy run -----------------------------------------------------------------------------------------
def test_a_real_generate_run_finishes_on_the_folded_model(shop, tiny_llm, monkeypatch):
    from peft import PeftModel

    from recbole_weaverec.quick_start import run

    seen, real = [], generation.generate_text

    def spy(model, *args):
        seen.append(isinstance(model, PeftModel))
        text = real(model, *args)
        assert isinstance(text, str)
        return text

    monkeypatch.setattr(generation, "generate_text", spy)
    out = run("LLMRec", "shop", config_dict={"data_path": str(shop), "llm_path": tiny_llm, "llm_eval": "generate",
                                             "eval_sample_users": 3, "generate_max_new_tokens": 12, **SMALL})
    assert len(seen) == 6 and seen[:3] == [True] * 3 and seen[3:] == [False] * 3  # test: the folded model
    assert all(0 <= out["test_result"][m] <= 1 for m in ("ndcg@1", "ndcg@5", "mrr@5", "hit@5"))


# --- 4. refusals --------------------------------------------------------------------------------------------------
def test_bad_llm_eval_settings_are_refused_in_one_line(shop, tiny_llm, tmp_path):
    from recbole_weaverec.quick_start import build_config, run

    common = {"data_path": str(shop), "llm_path": tiny_llm}
    cases = [({"llm_eval": "generate", "eval_mode": "full"},
              r"^llm_eval='generate' is not allowed with eval_mode=full .*use a sampled eval_mode \(e\.g\. uni29\) "
              r"or llm_eval=likelihood$"),
             ({"llm_eval": "sample"}, r"^llm_eval='sample' is not allowed: expected one of likelihood, generate$"),
             ({"llm_eval": "generate", "generate_max_new_tokens": 0}, r"generate_max_new_tokens=0 is out of range"),
             ({"generate_max_new_tokens": "many"}, r"generate_max_new_tokens='many' is not allowed")]
    for over, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            build_config("LLMRec", "shop", config_dict={**common, **over})
        assert "\n" not in str(err.value)
    write_tiny_dataset(shop, name="small", n_items=25)  # 25 items: no room beside 30 candidates and top 5
    with pytest.raises(ConfigError, match=r"llm_eval='generate' needs at least 34 items .*'small' has 25"):
        run("LLMRec", "small", config_dict={**common, **SMALL, "llm_eval": "generate"})


# --- 5. the default is the likelihood path, and generate uses its prompt --------------------------------------------
def test_default_is_likelihood_and_generate_reads_the_same_prompt(shop, tiny_llm, monkeypatch):
    from recbole.data.interaction import Interaction

    from recbole_weaverec.model.llm.llmrec import LLMRec
    from recbole_weaverec.quick_start import build_config, prepare

    config = build_config("LLMRec", "shop", config_dict={"data_path": str(shop), "llm_path": tiny_llm, **SMALL})
    assert config["llm_eval"] == "likelihood" and config["generate_max_new_tokens"] is None
    _, train_data, _, _ = prepare(config)
    model = LLMRec(config, train_data._dataset)
    cands = [[3, 1, 4, 5, 9, 2, 6, 8], [5, 11, 13, 14, 15, 16, 17, 18]]
    histories, lengths = [[7, 10, 12], [20, 21, 0]], [3, 2]
    rows = Interaction({"user_id": torch.tensor([1] * 8 + [2] * 8), "item_id": torch.tensor(cands[0] + cands[1]),
                        "item_id_list": torch.tensor(histories).repeat_interleave(8, 0),
                        "item_length": torch.tensor([3] * 8 + [2] * 8)})
    users = [(h[:n], c, (u + 1) * 1000003 + n) for u, (h, n, c) in enumerate(zip(histories, lengths, cands))]

    def never(*args):
        raise AssertionError("generated under llm_eval=likelihood")

    monkeypatch.setattr(generation, "generate_text", never)
    scores = model.predict(rows)
    assert not model.generated_positions
    assert torch.equal(scores, torch.cat([model.score_user(h, c, order_seed=seed) for h, c, seed in users]))

    prompts = []
    title = model.builder.truncate(model.target.titles[5])

    def answer(llm, tok, prompt_ids, max_new_tokens, stop_ids):
        prompts.append(list(prompt_ids))
        assert tok.eos_token_id in stop_ids
        return f"{title}||nothing listed"

    monkeypatch.setattr(generation, "generate_text", answer)
    model.generates = True  # what llm_eval: generate sets
    model.config["score_users_per_batch"] = 2  # generation goes one user at a time anyway
    scores = model.predict(rows)
    assert model.generated_positions
    # the likelihood path's prompts, one generate call per user
    assert prompts == [model._user_inputs(h, c, None, seed)[0] for h, c, seed in users]
    assert scores.tolist() == [0.0 if c == 5 else -math.inf for c in cands[0] + cands[1]]
