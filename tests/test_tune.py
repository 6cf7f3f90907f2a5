"""Tuning (issue 18.2/18.4): the params-file space, the Optuna search (budget, exhaustive grids, resume), selection by
validation only, a board's tune: blocks (tuned rows, chosen values, --untuned) and the tune command on tiny data."""
import gzip
import json
import math
import random

import pytest
import yaml

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.leaderboard import Leaderboard, LeaderboardConfigError, validate_config
from recbole_weaverec.leaderboard.fingerprint import loaded_code
from recbole_weaverec.leaderboard.tuning import with_params
from recbole_weaverec.tune.space import Space
from recbole_weaverec.tune.study import search

from conftest import write_tiny_dataset


# --- the space ------------------------------------------------------------------------------------------------------
def test_params_file_syntax_and_values(tmp_path):
    path = tmp_path / "p.hyper"
    path.write_text("reg_weight loguniform 0,9\nlayers choice [[64],[64, 32]]\ndropout uniform 0.1,0.5\n"
                    "n quniform 1,8,1\nshort line\n")
    space = Space.from_file(path)
    assert {n: k for n, (k, _) in space.params.items()} == {"reg_weight": "loguniform", "layers": "choice",
                                                            "dropout": "uniform", "n": "quniform"}
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        values = space.suggest(study.ask())
        assert 1.0 <= values["reg_weight"] <= math.exp(9)  # hyperopt's natural-log bounds
        assert values["layers"] in ([64], [64, 32]) and 0.1 <= values["dropout"] <= 0.5
        assert values["n"] in {float(i) for i in range(1, 9)}


@pytest.mark.parametrize("text, match", [
    ("reg_weight choice __import__('os').system('touch PWNED')", "not a literal list"),
    ("reg_weight loguniform 9,1", "low < high"),
    ("reg_weight uniform 1", "takes low,high"),
    ("reg_weight uniform 1,2,3", "takes low,high"),
    ("reg_weight quniform 1,8,0", "step q of reg_weight must be > 0"),
    ("reg_weight normal 1,2", "unknown parameter type 'normal'"),
    ("", "the search space is empty"),
])
def test_bad_params_file_one_line(tmp_path, monkeypatch, text, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.hyper").write_text(text + "\n")
    with pytest.raises(ConfigError, match=match) as e:
        Space.from_file(tmp_path / "p.hyper")
    assert "\n" not in str(e.value) and not (tmp_path / "PWNED").exists()


# --- the search -----------------------------------------------------------------------------------------------------
def test_grid_searched_exhaustively_and_resumed(tmp_path):
    space = Space.from_mapping({"a": "choice [1,2,3]", "b": "choice ['x','y']"}, "t")
    calls = []

    def evaluate(params):
        calls.append((params["a"], params["b"]))
        if len(calls) == 3:
            raise KeyboardInterrupt  # a killed search
        return params["a"] + (params["b"] == "y") * 0.5, {}

    kw = dict(trials=100, storage=str(tmp_path / "s.db"), study_name="g", seed=0)
    with pytest.raises(KeyboardInterrupt):
        search(space, evaluate, **kw)
    study, budget = search(space, evaluate, **kw)  # continues the same study
    assert budget == 6 and len(set(calls)) == 6 and len(calls) == 7  # the killed configuration ran again once
    assert study.best_trial.params == {"a": 3, "b": "y"}


def test_budget_failures_and_duplicates(tmp_path):
    space = Space.from_mapping({"x": "uniform 0,1"}, "t")
    seen = []

    def evaluate(params):
        seen.append(params["x"])
        return (None, {"error": "boom"}) if len(seen) == 2 else (-(params["x"] - 0.3) ** 2, {})

    study, budget = search(space, evaluate, trials=5, storage=str(tmp_path / "s.db"), study_name="f", seed=1)
    done = [t for t in study.trials if t.value is not None]
    assert budget == 5 and len(done) == 5 and len(seen) == 6  # the failed run did not use up a trial
    assert [t.user_attrs.get("error") for t in study.trials].count("boom") == 1
    with pytest.raises(ConfigError, match="trials=0"):
        search(space, evaluate, trials=0, storage=str(tmp_path / "s.db"), study_name="f", seed=1)


# --- a board's tune: blocks -----------------------------------------------------------------------------------------
@pytest.fixture
def data(tmp_path):
    write_tiny_dataset(tmp_path / "data", "tiny", seed=0)
    return tmp_path / "data"


def tuned_board(data, tmp_path, models=None, **over):
    raw = {"data_path": str(data), "output_dir": str(tmp_path / "out"), "datasets": ["tiny"], "seeds": [1, 2],
           "protocols": ["full"], "tuning": {"trials": 4, "seed": 7},
           "models": models or [{"model": "EASE", "tune": {"params": {"reg_weight": "choice [10,100,1000,5000]"}}},
                                "Pop"]}
    raw.update(over)
    return validate_config(raw)


class ScoredRunner:
    """Valid score peaks at reg_weight=100; test metrics come from ``test_rng`` (never from the valid score)."""

    def __init__(self, test_rng):
        self.calls, self.rng = [], test_rng

    def __call__(self, cell):
        self.calls.append(cell)
        lam = cell["config"].get("reg_weight", 250)
        valid = 0.5 - abs(math.log10(lam) - 2) * 0.1 + 0.001 * cell["seed"]
        test = self.rng.random()
        return {"status": "ok", "error": "", "metrics": {"ndcg@10": test}, "wall_s": 0.1, "history": "train",
                "model_type": "GENERAL", "valid_score": valid, "code": loaded_code()}


def test_board_tunes_on_validation_only(data, tmp_path):
    chosen = []
    for rng_seed in (0, 1):  # two runs whose test metrics differ completely
        cfg = tuned_board(data, tmp_path, output_dir=str(tmp_path / f"out{rng_seed}"))
        runner = ScoredRunner(random.Random(rng_seed))
        b = Leaderboard(cfg, runner=runner)
        assert b.run() == 0
        ease = [c for c in runner.calls if c["model"] == "EASE"]
        # 4 trials on seed 1, then seed 2 with the chosen value; seed 1's tuned cell is the chosen trial itself
        assert [c["seed"] for c in ease] == [1, 1, 1, 1, 2]
        rows = [r for r in b.rows() if r["model"] == "EASE"]
        assert {r["tuning"] for r in rows} == {"tuned: 4 trials"} and all(r["status"] == "ok" for r in rows)
        chosen.append(rows[0]["tuned_params"])
        assert {r["tuning"] for r in b.rows() if r["model"] == "Pop"} == {"defaults"}
        md = (tmp_path / f"out{rng_seed}" / "results.md").read_text()
        assert "## Tuning" in md and "reg_weight=100" in md and "tuned: 4 trials" in md
        # a second run computes nothing: the study, the trials and the tuned cells are cached
        again = ScoredRunner(random.Random(5))
        assert Leaderboard(cfg, runner=again).run() == 0 and again.calls == []
    assert chosen == [{"reg_weight": 100}, {"reg_weight": 100}]


def test_untuned_rows_and_changed_space(data, tmp_path):
    cfg = tuned_board(data, tmp_path)
    runner = ScoredRunner(random.Random(0))
    b = Leaderboard(cfg, runner=runner, tuned=False)
    b.run()
    assert all(r["tuning"] == "defaults" for r in b.rows())
    assert all("reg_weight" not in c["config"] for c in runner.calls)
    assert (tmp_path / "out" / "untuned" / "results.md").is_file() and not (tmp_path / "out" / "results.md").exists()
    # another space is another search (the cached trials with the same values are reused, not run again)
    Leaderboard(cfg, runner=ScoredRunner(random.Random(0))).run()
    cfg2 = tuned_board(data, tmp_path, models=[
        {"model": "EASE", "tune": {"params": {"reg_weight": "choice [10,100,20000]"}}}, "Pop"])
    again = ScoredRunner(random.Random(0))
    Leaderboard(cfg2, runner=again).run()
    assert [c["config"]["reg_weight"] for c in again.calls] == [20000]


@pytest.mark.parametrize("entry, match", [
    ({"model": "EASE", "tune": {"params": {"seed": "choice [1,2]"}}}, "'seed' cannot be tuned"),
    ({"model": "EASE", "config": {"reg_weight": 5}, "tune": {"params": {"reg_weight": "choice [1,2]"}}},
     "both set in config and tuned"),
    ({"model": "EASE", "tune": {"params": {"reg_weight": "normal 1,2"}}}, "is not 'TYPE VALUES'"),
    ({"model": "EASE", "tune": {"grid": 1}}, "must be {params"),
    ({"model": "EASE", "tune": {"params_file": "nope.hyper"}}, "params file 'nope.hyper' not found"),
])
def test_bad_tune_block_refused(data, tmp_path, entry, match):
    with pytest.raises(LeaderboardConfigError, match=match):
        tuned_board(data, tmp_path, models=[entry])


def test_with_params_changes_the_cache_key(data, tmp_path):
    cell = [c for c in Leaderboard(tuned_board(data, tmp_path)).cells if c["model"] == "EASE"][0]
    assert with_params(cell, {"reg_weight": 10})["hash"] != with_params(cell, {"reg_weight": 100})["hash"] \
        != cell["hash"]


# --- the command, end to end on a tiny dataset ----------------------------------------------------------------------
def test_tune_command_end_to_end(data, tmp_path, monkeypatch, capsys):
    from recbole_weaverec.tune.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ease.hyper").write_text("reg_weight choice [1,300]\n")
    args = ["--model=EASE", "--dataset=tiny", f"--data_path={data}", "--params_file=ease.hyper", "--quiet",
            "--state=WARNING"]
    assert main(args) == 0
    out = capsys.readouterr()
    records = list((tmp_path / "tune" / "tuned").glob("*.json"))
    record = json.loads(records[0].read_text())
    assert len(records) == 1 and record["trials"] == 2 and record["params"]["reg_weight"] in (1, 300)
    assert f"reg_weight: {record['params']['reg_weight']}" in out.out and "test result" in out.out
    cells = sorted((tmp_path / "tune" / "cells").glob("*.json"))
    assert len(cells) == 2
    scores = {json.loads(p.read_text())["valid_score"] for p in cells}
    assert record["valid_score"] == max(scores)
    assert main(args) == 0  # a second call: nothing new runs
    assert sorted((tmp_path / "tune" / "cells").glob("*.json")) == cells
    (tmp_path / "bad.hyper").write_text("eval_args choice [1]\n")
    assert main(args[:3] + ["--params_file=bad.hyper"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "'eval_args' cannot be tuned" in err


def test_board_yaml_tune_block_reads_a_params_file(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ease.hyper").write_text("reg_weight choice [10,100]\n")
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"data_path": str(data), "datasets": ["tiny"], "protocols": ["full"],
                                    "models": [{"model": "EASE", "tune": {"params_file": "ease.hyper"}}]}))
    from recbole_weaverec.leaderboard.config import load_config

    cfg = load_config(path)
    assert cfg["tuning"]["trials"] == 8 and cfg["models"][0]["tune"].size() == 2


def test_protocol_selection(data, tmp_path):
    cfg = tuned_board(data, tmp_path, protocols=["full", "uni29"])
    runner = ScoredRunner(random.Random(0))
    b = Leaderboard(cfg, runner=runner)
    assert b.run(only=["Pop"], protocols=["uni29"]) == 0
    assert {(c["model"], c["protocol"]) for c in runner.calls} == {("Pop", "uni29")}
    with pytest.raises(LeaderboardConfigError, match="--protocol 'uni5' is not a table of this board: full, uni29"):
        b.select(protocols=["uni5"])
    with pytest.raises(LeaderboardConfigError, match="--dataset 'toys' is not a dataset of this board: tiny"):
        b.select(datasets=["toys"])
    assert {c["dataset"] for c in b.select(datasets=["tiny"])} == {"tiny"}


def test_search_starts_again_when_its_trials_ran_stale_code(data, tmp_path):
    cfg = tuned_board(data, tmp_path)
    Leaderboard(cfg, runner=ScoredRunner(random.Random(0))).run()
    for path in (tmp_path / "out" / "cache" / "cells").glob("*.json"):  # as if ease.py had been edited since
        row = json.loads(path.read_text())
        row["code"] = {**row["code"], "model/lae/ease.py": "an older version"}
        path.write_text(json.dumps(row))
    for path in (tmp_path / "out" / "cells").glob("*.json.gz"):  # the committed archive's copies too
        row = json.loads(gzip.decompress(path.read_bytes()))
        row["code"] = {**row["code"], "model/lae/ease.py": "an older version"}
        path.write_bytes(gzip.compress(json.dumps(row).encode()))
    again = ScoredRunner(random.Random(1))
    b = Leaderboard(cfg, runner=again)
    assert all(r["tuning"] == "to tune" for r in b.rows() if r["model"] == "EASE")
    assert b.run() == 0
    assert [c["seed"] for c in again.calls if c["model"] == "EASE"] == [1, 1, 1, 1, 2]  # a new search, then seed 2
    assert {r["tuning"] for r in b.rows() if r["model"] == "EASE"} == {"tuned: 4 trials"}
