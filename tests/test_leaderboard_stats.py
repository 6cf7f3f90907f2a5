"""Leaderboard statistics: cells keep per-user metrics, headline tables show 95% intervals, the best is bold only
when a paired test over users says so, old cached rows still render, charts draw the intervals."""
import json
import re

import numpy as np
import pytest
from scipy import stats

from recbole_weaverec import leaderboard as lb
from recbole_weaverec.leaderboard import Leaderboard, render_markdown, validate_config, write_charts
from recbole_weaverec.leaderboard.significance import NO_PER_USER

from test_leaderboard import _row


def test_cells_keep_per_user_metrics_averaging_to_the_cell_metric(tiny_data, run_dir):
    from recbole_weaverec.quick_start import run

    cfg = validate_config({
        "data_path": str(tiny_data), "output_dir": str(run_dir / "out"), "datasets": ["tiny"], "seeds": [1],
        "config": {"state": "WARNING"},
        "protocols": {"full": {"config": {"metrics": ["NDCG", "Hit"], "topk": [5, 10]}},
                      "uni29": {"config": {"metrics": ["NDCG", "MRR"], "topk": [1, 5], "valid_metric": "NDCG@5"}}},
        "models": ["EASE", "Pop"]})
    board = Leaderboard(cfg, runner=lb.run_cell, show_progress=False)
    assert board.run() == 0
    rows = {(c["protocol"], c["model"]): json.loads((board.cache / "cells" / f"{c['hash']}.json").read_text())
            for c in board.cells}
    assert len(rows) == 4
    for (protocol, model), row in rows.items():
        pu = row["per_user"]
        assert len(pu["users"]) == len(set(pu["users"])) == 40 and pu["users"] == sorted(pu["users"])
        assert set(pu["metrics"]) == {m for m in row["metrics"] if "@" in m} and len(pu["metrics"]) == 4
        for metric, values in pu["metrics"].items():
            assert len(values) == 40 and all(round(v, 6) == v for v in values)  # stored compactly
            assert np.mean(values) == pytest.approx(row["metrics"][metric], abs=1e-6), (protocol, model, metric)
        assert pu["users"] == rows[(protocol, "Pop")]["per_user"]["users"]  # one table: the same users
        assert (row["history"], row["tie_break"]) == (("train+valid", "popularity") if model == "EASE"
                                                      else ("train", "none"))
    # the cell's metrics are RecBole's (to its 4 decimals); a plain run hands back no per-user values
    (cell,) = [c for c in board.cells if c["protocol"] == "full" and c["model"] == "EASE"]
    plain = run("EASE", "tiny", config_dict={k: v for k, v in cell["config"].items() if k != "sample_seed"})
    assert "test_per_user" not in plain
    assert {k: round(v, 4) for k, v in rows[("full", "EASE")]["metrics"].items()} == plain["test_result"]
    md = (run_dir / "out" / "results.md").read_text()
    head = md[md.index("Test NDCG@10:"):md.index("### `full` · tiny")]
    assert "| model | sources | history / ties / seen items | tuning | tiny |" in head
    assert re.search(r"\| EASE \| - \| train\+valid / popularity / removed \| defaults \| (\*\*)?0\.\d{4} ± 0\.\d{4}(\*\*)? \|", head)
    assert re.search(r"\| Pop \| - \| train / none / removed \| defaults \| (\*\*)?0\.\d{4} ± 0\.\d{4}(\*\*)? \|", head)
    assert NO_PER_USER not in md


def _pu_row(label, seed, values, dataset="d1", users=None, protocol="full"):
    r = _row(label, seed, float(np.mean(values)), dataset=dataset)
    r.update({"protocol": protocol, "tie_break": "popularity", "metrics": {"ndcg@10": float(np.mean(values))},
              "per_user": {"users": users or [f"u{i:03d}" for i in range(len(values))],
                           "metrics": {"ndcg@10": [round(float(v), 6) for v in values]}}})
    return r


def _headline(md, protocol="full"):
    part = md[md.index(f"## Protocol `{protocol}`"):]
    part = part[part.index("Test NDCG@10:"):part.index("### ")]
    lines = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[5:-1]]
             for ln in part.splitlines() if ln.startswith("| ") and not ln.startswith("| model")}
    return part, lines


def _users(n=300, seed=0):
    return np.random.default_rng(seed).random(n)


def test_clear_winner_bold_tie_not_bold_with_footnote():
    rng = np.random.default_rng(1)
    base = _users()
    a1, a2 = base + 0.1 + rng.normal(0, 0.02, 300), base + 0.1 + rng.normal(0, 0.02, 300)  # two seeds
    noise = rng.normal(0, 0.05, 300)
    tie = base + noise - noise.mean() + 0.0005  # 0.0005 above B on average, per-user spread 0.05: noise
    rows = [_pu_row("A", 1, a1), _pu_row("A", 2, a2), _pu_row("B", 1, base),
            _pu_row("C", 1, tie, dataset="d2"), _pu_row("B", 1, base, dataset="d2"),
            _pu_row("D", 1, base - 0.2, dataset="d2")]
    md = render_markdown(rows, now="2026-01-01 00:00 UTC")
    part, lines = _headline(md)
    # d1: A, seeds averaged per user first, mean ± the t interval's half-width; clearly better than B: bold
    avg = (a1.round(6) + a2.round(6)) / 2
    low, high = stats.t.interval(0.95, len(avg) - 1, loc=avg.mean(), scale=stats.sem(avg))
    assert lines["A"][0] == f"**{avg.mean():.4f} ± {(high - low) / 2:.4f}**"
    assert lines["B"][0] == f"{base.mean():.4f} ± {stats.sem(base) * stats.t.ppf(0.975, 299):.4f}"
    # d2: C has the highest mean but is tied with B (not bold, footnote); D is significantly worse (not tied)
    assert not any("**" in cells[1] for cells in lines.values() if len(cells) > 1)
    assert lines["C"][1].startswith(f"{tie.mean():.4f} ± ") and lines["D"][1].startswith(f"{(base - 0.2).mean():.4f}")
    note = next(ln for ln in part.splitlines() if ln.startswith("- `d2`:"))
    assert "C is not significantly better than B" in note and note.endswith("tied with C: B")
    assert "- `d1`" not in part and NO_PER_USER not in md
    assert "| history / ties / seen items |" in part and "| train+valid / popularity / removed |" in part


def test_rows_without_per_user_data_still_render(tmp_path):
    base = _users()
    old = [_row("Old", 1, 0.9), _row("Old", 2, 0.8), _row("Older", 1, 0.1, dataset="d2"),
           dict(_row("Old", 1, 0.5), protocol="uni29")]
    rows = old + [_pu_row("New", 1, base), _pu_row("New", 1, base, dataset="d2"),
                  _pu_row("New", 1, base, protocol="uni29")]
    md = render_markdown(rows, now="2026-01-01 00:00 UTC")
    assert md.count(NO_PER_USER) == 1 and f"_Old, Older: {NO_PER_USER}" in md
    part, lines = _headline(md)
    assert lines["Old"][0] == "0.8500" and lines["Old"][1] == "-"  # the mean, no interval, no bold
    assert lines["New"][0].startswith("0.") and " ± " in lines["New"][0] and "**" not in lines["New"][0]
    assert "- `d1`: Old vs New not tested (no per-user data)" in part
    assert "**" not in lines["New"][1] and "- `d2`: New vs Older not tested (no per-user data)" in part
    assert "| train+valid / - / removed |" in part  # a row cached before tie_break was recorded
    assert len(write_charts(rows, None, tmp_path)) == 4  # NDCG@10 and Hit@10 of each protocol
    assert all((tmp_path / f).read_bytes()[:4] == b"\x89PNG" for f in ("full_NDCG-10.png", "uni29_NDCG-10.png"))


def test_different_users_are_not_paired():
    base = _users()
    other = [f"v{i:03d}" for i in range(300)]
    rows = [_pu_row("A", 1, base + 0.3), _pu_row("B", 1, base, users=other),
            _pu_row("C", 1, base + 0.2, dataset="d2"), _pu_row("C", 2, base + 0.2, dataset="d2", users=other),
            _pu_row("B", 1, base, dataset="d2")]
    md = render_markdown(rows, now="2026-01-01 00:00 UTC")
    part, lines = _headline(md)
    assert "- `d1`: A and B were scored on different users (300 vs 300): not compared" in part
    assert "**" not in lines["A"][0]
    # C's two seeds saw different users: not averaged (its mean alone), so nothing to pair with B
    assert "- `d2`, C: seeds 1 and 2 were scored on different users (300 vs 300): not averaged" in part
    assert lines["C"][1] == f"{(base + 0.2).mean():.4f}" and "- `d2`: C vs B not tested" in part


def test_charts_draw_the_95_percent_intervals(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn, real = [], Axes.errorbar
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, yerr=None, **kw: drawn.append(
        (list(x), list(y), list(yerr))) or real(self, x, y, yerr=yerr, **kw))
    base = _users()
    rows = [_pu_row("A", 1, base + 0.1), _pu_row("A", 1, base, dataset="d2"), _row("Old", 1, 0.4)]
    charts = write_charts(rows, None, tmp_path)
    assert set(charts) == {("full", "ndcg@10"), ("full", "hit@10")}
    # NDCG@10: A's two bars with their intervals; Old has none; Hit@10 has no per-user data: no error bar
    ((xs, ys, errs),) = drawn
    half = stats.sem(base.round(6)) * stats.t.ppf(0.975, 299)
    assert len(xs) == 2 and ys == pytest.approx([(base + 0.1).mean(), base.mean()], abs=1e-6)
    assert errs == pytest.approx([half, half], rel=1e-3)


def test_per_user_values_that_disagree_with_the_trainer_are_not_stored(capsys):
    from recbole_weaverec.leaderboard.runner import _with_per_user

    per_user = {"users": ["b", "a", "c"], "metrics": {"ndcg@5": [0.2, 0.1, 0.6]}}
    metrics, kept = _with_per_user({"ndcg@5": 0.3, "itemcoverage@5": 0.5}, per_user, 4)
    assert kept == {"users": ["a", "b", "c"], "metrics": {"ndcg@5": [0.1, 0.2, 0.6]}}  # sorted by user, paired
    assert metrics == {"ndcg@5": pytest.approx(0.3, abs=1e-12), "itemcoverage@5": 0.5}
    metrics, kept = _with_per_user({"ndcg@5": 0.31}, per_user, 4)  # e.g. a trainer that scores its own way
    assert kept is None and metrics == {"ndcg@5": 0.31}
    assert "per-user ndcg@5 averages 0.300000, the trainer reported 0.31" in capsys.readouterr().err


def test_per_user_needs_one_process():
    from recbole_weaverec.quick_start import run

    with pytest.raises(ValueError) as e:
        run("Pop", "tiny", nproc=2, per_user=True)
    assert str(e.value) == "per_user=True needs a single-process run, got nproc=2, world_size=-1"


def test_full_ranking_tables_say_whether_seen_items_stay_in_the_ranking():
    """RecBole removes a user's training items from a full ranking for general models only: the column says which
    rows can recommend a repeat; sampled protocols (candidates never include seen items) keep two parts."""
    base = _users()
    seq = dict(_pu_row("Seq", 1, base), model_type="SEQUENTIAL")
    rows = [_pu_row("Gen", 1, base), seq, dict(_pu_row("Gen", 1, base, protocol="uni29")),
            dict(seq, protocol="uni29")]
    md = render_markdown(rows, now="2026-01-01 00:00 UTC")
    full, uni = md[:md.index("## Protocol `uni29`")], md[md.index("## Protocol `uni29`"):]
    assert "| Seq | - | train+valid / popularity / ranked |" in full
    assert "| Gen | - | train+valid / popularity / removed |" in full
    assert "seen items" not in uni and "| Seq | - | train+valid / popularity |" in uni
