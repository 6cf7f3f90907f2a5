"""benchmarks/paper_comparison.py's report on hand-made rows (no model runs): the paired Δ and its interval are
``stats.paired_difference`` on users aligned by token, and rows of other users are refused."""
import numpy as np
import pytest

from benchmarks import paper_comparison as pc
from recbole_weaverec.stats import paired_difference

USERS = [f"u{i}" for i in range(8)]


def row(key, ndcg, users=USERS):
    values = np.asarray(ndcg, dtype=np.float64)
    return {"key": key, "users": list(users), "seconds": 1.0,
            "metrics": {"ndcg@5": values.tolist(), "hit@5": (values > 0).astype(float).tolist(),
                        "mrr@5": (values / 2).tolist()}}


def test_delta_is_paired_difference_on_aligned_users():
    ref = row("θ0", [0.1, 0.0, 0.5, 1.0, 0.0, 0.2, 0.3, 0.0])
    values = {u: v for u, v in zip(USERS, [0.3, 0.1, 0.5, 0.6, 0.2, 0.9, 0.3, 0.4])}
    order = [3, 0, 7, 5, 1, 6, 2, 4]  # the same users in another order
    other = row("WeaveRec", [values[USERS[i]] for i in order], users=[USERS[i] for i in order])
    expected = paired_difference([values[u] for u in USERS], ref["metrics"]["ndcg@5"])
    assert pc.delta(other, ref) == expected
    assert pc.fmt(expected) in pc.case_table({"WeaveRec": other, "θ0": ref}, {"θ0": ref})


def test_rows_on_other_users_are_refused():
    ref = row("θ0", np.linspace(0, 1, 8))
    with pytest.raises(ValueError, match="not evaluated on the same users"):
        pc.delta(row("Pop", np.zeros(8), users=USERS[:7] + ["someone else"]), ref)
    with pytest.raises(ValueError, match="not evaluated on the same users"):
        pc.delta(row("Pop", np.zeros(7), users=USERS[:7]), ref)
    keys = {"single": {"θ0": "θ0", "Pop": "Pop"}}
    with pytest.raises(ValueError, match="Pop and θ0 were not evaluated on the same users"):
        pc.report_body([ref, row("Pop", np.zeros(7), users=USERS[:7])], "t", [("single", ["s"])], keys, "setup")


def test_claim_reads_each_part_from_its_interval():
    base = np.asarray([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    found = {"LLMRec (θ0)": row("θ0", base + 0.2), "WeaveRec (average)": row("w", base + 0.2),
             "LLMJoint": row("j", base), "LLMMerge (average)": None}
    text = pc.claim(found)
    assert "WeaveRec (average) vs LLMRec (θ0) +0.0000 [+0.0000, +0.0000]: no difference, so `≥` holds" in text
    assert "LLMRec (θ0) vs LLMJoint +0.2000 [+0.2000, +0.2000]: better, so `>` holds" in text
    assert text.endswith("LLMRec (θ0) > LLMMerge (average): pending → claim pending")
    found["LLMMerge (average)"] = row("m", base + 0.2)
    assert pc.claim(found).endswith("no difference, so `>` does not hold → claim not supported")


def test_cases_and_domain_settings():
    args = pc.parse(["--target", "amazon-toys", "--sources", "ml-100k,amazon-beauty", "--workdir", "/tmp/x",
                     "--domain-setting", "ml-100k:title_field=movie_title",
                     "--domain-setting", "ml-100k:title_fallback_field=none"])
    assert pc.cases(args) == [("single", ["ml-100k"]), ("multi", ["ml-100k", "amazon-beauty"])]
    assert pc.domain_settings(args) == {"amazon-toys": {"title_fallback_field": "categories"},
                                        "amazon-beauty": {"title_fallback_field": "categories"},
                                        "ml-100k": {"title_field": "movie_title", "title_fallback_field": None}}
    one = pc.parse(["--target", "ml-100k", "--sources", "amazon-toys", "--workdir", "/tmp/x"])
    assert pc.cases(one) == [("single", ["amazon-toys"])]


def test_rescore_line_compares_the_same_theta0_under_the_other_rule():
    args = pc.parse(["--target", "ml-100k", "--sources", "amazon-toys", "--workdir", "/tmp/x", "--llm-score", "sum"])
    assert pc.rescore_label(args) == "LLMRec (θ0), llm_score mean"
    theta0_key = pc.row_key("LLMRec (θ0)", args, ["amazon-toys"])
    rescore_key = pc.row_key(pc.rescore_label(args), args, [])
    assert rescore_key != theta0_key
    base = np.asarray([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    keys = {"single": {"LLMRec (θ0)": theta0_key}, "rescore": {pc.rescore_label(args): rescore_key}}
    theta0, other = row(theta0_key, base + 0.1), row(rescore_key, base)
    assert pc.rescore_line({theta0_key: theta0}, keys) == ""  # nothing to say before the rescore row exists
    line = pc.rescore_line({theta0_key: theta0, rescore_key: other}, keys)
    assert "LLMRec (θ0), llm_score mean 0.3500 NDCG@5 vs 0.4500" in line
    assert pc.fmt(pc.delta(other, theta0)) in line and "-0.1000" in line


def test_learned_row_only_with_its_flag_and_keyed_like_the_others():
    plain = pc.parse(["--target", "amazon-sports", "--sources", "amazon-beauty", "--workdir", "/tmp/x"])
    learned = pc.parse(["--target", "amazon-sports", "--sources", "amazon-beauty", "--workdir", "/tmp/x", "--learned"])
    assert "WeaveRec (learned)" not in pc.llm_rows(plain)  # finished sections keep their rows
    assert pc.llm_rows(learned)[-1] == "WeaveRec (learned)"
    assert pc.row_key("WeaveRec (learned)", learned, ["amazon-beauty"]) != pc.row_key("WeaveRec (average)", learned,
                                                                                       ["amazon-beauty"])
    assert pc.LEARNED["weave_merge"] == "learned" and not pc.LEARNED["weave_compare_target_only"]
