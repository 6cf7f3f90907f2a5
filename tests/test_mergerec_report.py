"""The MergeRec benchmark's report (issue 15.2) on synthetic rows: users aligned by id, learned rows averaged over
their seeds, the best training-free merge as the reference, domain-stratified intervals and the two verdicts."""
import numpy as np
import pytest

from benchmarks import mergerec_report as rep
from recbole_weaverec.stats import domain_average_difference, paired_difference

DOMAINS = ["d1", "d2"]


def entry(values, users=None):
    users = users or [f"u{i}" for i in range(len(values))]
    return {"users": users, "ndcg@10": list(values), "recall@10": list(values)}


def synthetic(shift_own, shift_learned, n=400, seed=0):
    rng = np.random.default_rng(seed)
    base = {d: rng.random(n) for d in DOMAINS}
    users = [f"u{i}" for i in range(n)]

    def row(shift, noise=0.0):
        return {d: entry(np.clip(base[d] + shift + noise * rng.standard_normal(n), 0, 1), users) for d in DOMAINS}

    rows = {rep.PRETRAINED: row(0.0), rep.OWN: row(shift_own, 0.01)}
    rows[rep.FREE[0]] = row(0.0)
    rows[rep.FREE[1]] = row(0.02)  # the best training-free merge: the reference of the learned rows
    rows[rep.FREE[2]] = row(-0.02)
    rows[rep.LEARNED[0]] = {"0": row(0.02 + shift_learned, 0.01), "1": row(0.02 + shift_learned, 0.01)}
    return rows


def test_verdicts_follow_the_intervals():
    found = rep.comparisons(synthetic(0.05, 0.03), DOMAINS, n_resamples=2000)
    assert [label for label, _, _ in found] == [
        f"{rep.OWN} − {rep.PRETRAINED}", f"{rep.LEARNED[0]} − {rep.FREE[1]} (best training-free)"]
    lines = rep.verdicts(found, DOMAINS)
    assert "on its own domain: yes (better on 2 of 2" in lines[0]
    assert "average over domains: yes" in lines[1]
    worse = rep.verdicts(rep.comparisons(synthetic(-0.05, -0.03), DOMAINS, n_resamples=2000), DOMAINS)
    assert "on its own domain: no (better on 0 of 2 domains, worse on 2" in worse[0]
    assert "average over domains: no, it is worse" in worse[1]
    same = rep.verdicts(rep.comparisons(synthetic(0.0, 0.0), DOMAINS, n_resamples=2000), DOMAINS)
    assert "no difference (" in same[1]
    table = rep.table(synthetic(0.05, 0.03), DOMAINS)
    assert "| 0, 1 |" in table and " ± " in table  # learned rows: mean ± std over seeds


def test_rows_are_aligned_by_user_and_seeds_averaged_per_user():
    rows = {rep.LEARNED[0]: {"0": {"d1": entry([1.0, 0.0, 0.5], ["a", "b", "c"])},
                             "1": {"d1": entry([0.0, 0.0, 1.0], ["c", "b", "a"])}},
            rep.FREE[0]: {"d1": entry([0.2, 0.4, 0.6], ["b", "c", "a"])}}
    assert rep.per_user(rows, rep.LEARNED[0], "d1", "ndcg@10", ["a", "b", "c"]).tolist() == [1.0, 0.0, 0.25]
    assert rep.per_user(rows, rep.FREE[0], "d1", "ndcg@10", ["a", "b", "c"]).tolist() == [0.6, 0.2, 0.4]
    rows[rep.FREE[0]]["d1"] = entry([0.2, 0.4], ["b", "c"])
    with pytest.raises(ValueError, match="different users"):
        rep.per_user(rows, rep.FREE[0], "d1", "ndcg@10", ["a", "b", "c"])


def test_domain_average_difference_weighs_domains_equally_and_resamples_within_them():
    rng = np.random.default_rng(1)
    big, small = rng.normal(0.1, 1, 4000), rng.normal(-0.3, 1, 200)
    d = domain_average_difference([big, small], n_resamples=4000)
    assert d["mean"] == pytest.approx((big.mean() + small.mean()) / 2) and d["n"] == 4200
    # the small domain's spread dominates: half of its standard error, not the pooled one
    half = (d["high"] - d["low"]) / 2
    expected = 1.96 * np.hypot(big.std() / np.sqrt(4000), small.std() / np.sqrt(200)) / 2
    assert half == pytest.approx(expected, rel=0.15)
    one = domain_average_difference([big], n_resamples=4000)  # one domain: the paired bootstrap itself
    assert one == paired_difference(big, np.zeros_like(big), n_resamples=4000)
    assert domain_average_difference([np.ones(3), np.zeros(5)])["low"] == 0.5
    with pytest.raises(ValueError, match=">= 2 users"):
        domain_average_difference([np.ones(1)])


def test_objective_table_places_every_row_and_correlates_it_with_the_metric():
    rows = synthetic(0.05, 0.03)
    # objectives ordered opposite to the rows' NDCG@10: a lower objective goes with a better metric
    ndcg = {k: rep._row_ndcg(rows, k, DOMAINS) for k in [rep.PRETRAINED, rep.OWN, *rep.FREE]}
    ndcg.update({f"{rep.LEARNED[0]} | seed {s}": rep._row_ndcg(rows, f"{rep.LEARNED[0]} | seed {s}", DOMAINS)
                 for s in "01"})
    objectives = {k: {d: 10.0 - v for d in DOMAINS} for k, v in ndcg.items()}
    learn = {f"{rep.LEARNED[0]} | seed 0": {"valid": [[0, 9.0], [100, 8.5], [200, 8.7]], "kept_step": 100}}
    text = rep.objective_table(objectives, learn, rows, DOMAINS)
    assert "Spearman ρ = -1.00" in text and "over the 7 rows" in text
    assert "9.0000 → 8.5000 (100) → 8.7000" in text
    ta = 10.0 - ndcg[rep.FREE[1]]
    seed0 = 10.0 - ndcg[f"{rep.LEARNED[0]} | seed 0"]
    assert f"from its start, {rep.FREE[1]}, {ta:.4f} to {seed0:.4f} ({seed0 - ta:+.4f})" in text
    assert "over the 5 merged models" in text  # three training-free merges, two seeds of the learned row
    assert rep.objective_table({}, {}, rows, DOMAINS) == ""


def test_a_learned_row_is_also_compared_with_the_merge_it_starts_from():
    rows = synthetic(0.05, 0.03)
    rows[rep.FREE[2]] = rows[rep.FREE[1]]  # TIES ties task arithmetic ...
    rows[rep.FREE[1]] = synthetic(0.05, 0.03, seed=0)[rep.FREE[0]]  # ... which now sits lower: TIES is the best
    found = rep.comparisons(rows, DOMAINS, n_resamples=2000)
    labels = [label for label, _, _ in found]
    assert f"{rep.LEARNED[0]} − {rep.FREE[2]} (best training-free)" in labels
    assert f"{rep.LEARNED[0]} − {rep.FREE[1]} (its start)" in labels
    lines = rep.verdicts(found, DOMAINS)
    assert any(line.startswith(f"- {rep.LEARNED[0]} beats the merge it starts from on the average over domains: yes")
               for line in lines), lines
