"""WeaveRec's comparison evaluations (θ0 alone, zero-shot, Pop on the same test users and candidates) give their
per-user values too (a caller that records evaluations: ``benchmarks/paper_comparison.run_with_comparisons`` ->
``extra_per_user``), so a benchmark can put paired intervals on them without training θ0 or scoring the zero-shot
model again. The package's own run() is unchanged (every cached leaderboard cell hashed it)."""
import sys
from pathlib import Path

import test_domains
from test_domains import SMALL

two_platforms, tiny_llm = test_domains.two_platforms, test_domains.tiny_llm  # the same fixtures

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
EXTRA = ("target_only_test_result", "zero_shot_test_result", "pop_test_result")


def test_each_comparison_keeps_its_own_per_user_values(two_platforms, tiny_llm, tmp_path, monkeypatch):
    from benchmarks.paper_comparison import run_with_comparisons

    monkeypatch.chdir(tmp_path)
    out = run_with_comparisons("WeaveRec", "shop", {"data_path": str(two_platforms), "source_domains": ["films"],
                                                    "llm_path": tiny_llm, "adapter_dir": str(tmp_path / "adapters"),
                                                    "weave_compare_target_only": True,
                                                    "weave_compare_baselines": True, **SMALL})
    assert sorted(out["extra_per_user"]) == sorted(EXTRA)
    users = out["test_per_user"]["users"]
    assert len(users) == SMALL["eval_sample_users"]
    for key in EXTRA:
        extra = out["extra_per_user"][key]
        assert extra["users"] == users, key
        assert set(extra["metrics"]) == set(out[key]), key
        for metric, value in out[key].items():  # each key's values are its own evaluation's, not another's
            assert round(float(extra["metrics"][metric].mean()), 4) == value, (key, metric)


def test_no_extra_per_user_without_per_user(two_platforms, tiny_llm, tmp_path, monkeypatch):
    from recbole_weaverec.quick_start import run

    monkeypatch.chdir(tmp_path)
    out = run("WeaveRec", "shop", config_dict={"data_path": str(two_platforms), "source_domains": ["films"],
                                               "llm_path": tiny_llm, "adapter_dir": str(tmp_path / "adapters"),
                                               "weave_compare_target_only": True, "weave_compare_baselines": False,
                                               **SMALL})
    assert "extra_per_user" not in out and "target_only_test_result" in out
