"""Leaderboard: config validation, grid expansion, caching, failure isolation, markdown, a real tiny run."""
import collections
import csv
import json
import os
import shutil

import pytest
import yaml

from recbole_weaverec import __version__, leaderboard as lb
from recbole_weaverec.errors import ConfigError
from recbole_weaverec.leaderboard import (Leaderboard, LeaderboardConfigError, expand_grid, fingerprint, main,
                                          render_markdown, validate_config)

from conftest import needs_shared_data, write_tiny_dataset


@pytest.fixture
def data(tmp_path):
    root = tmp_path / "data"
    for name, seed in (("tiny", 0), ("tinyb", 1), ("tinyc", 2)):
        write_tiny_dataset(root, name, seed=seed)
    return root


def board(data, tmp_path, **over):
    raw = {"data_path": str(data), "output_dir": str(tmp_path / "out"), "datasets": ["tiny", "tinyb"],
           "seeds": [1, 2], "protocols": ["full", "uni29"], "models": ["EASE", "Pop"]}
    raw.update(over)
    return validate_config(raw)


class FakeRunner:
    """Stands in for the subprocess: counts calls, fails the cells of a chosen label."""

    def __init__(self, fail_label=None, interrupt_after=None):
        self.calls = []
        self.fail_label = fail_label
        self.interrupt_after = interrupt_after

    def __call__(self, cell):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        self.calls.append(cell["hash"])
        if cell["label"] == self.fail_label:
            return {"status": "failed", "error": "ConfigError: reg_weight='abc' is not a number", "metrics": {},
                    "wall_s": 0.1, "history": "", "model_type": ""}
        score = 0.1 * (len(cell["label"]) % 5) + 0.01 * cell["seed"]
        return {"status": "ok", "error": "", "metrics": {"ndcg@10": score, "recall@10": 2 * score},
                "wall_s": 0.5, "history": "train+valid", "model_type": "TRADITIONAL", "valid_score": score,
                "code": fingerprint.loaded_code()}


def test_grid_expansion(data, tmp_path):
    cfg = board(data, tmp_path, models=[
        {"model": "EASE", "seeds": [1]},
        "Pop",
        {"model": "SASRec", "protocols": ["uni29"], "datasets": ["tiny"], "config": {"epochs": 2}},
        {"model": "BPR", "label": "BPR-x", "source_domains": ["others", ["tinyb", "tinyc"]]},
        {"model": "GRU4Rec", "merge_domains": "all", "seeds": [3], "protocols": ["full"]},
    ])
    cells = expand_grid(cfg)
    by = lambda label: [c for c in cells if c["label"] == label]  # noqa: E731
    assert len(by("EASE")) == 2 * 2 * 1 and len(by("Pop")) == 2 * 2 * 2
    assert len(by("SASRec")) == 2 and {c["protocol"] for c in by("SASRec")} == {"uni29"}
    # BPR: 'others' -> the other board dataset; [tinyb, tinyc] loses the target tinyb when tinyb is the target
    bpr = {(c["protocol"], c["dataset"], tuple(c["sources"]), c["seed"]) for c in by("BPR-x")}
    assert ("full", "tiny", ("tinyb",), 1) in bpr and ("full", "tinyb", ("tiny",), 2) in bpr
    assert ("full", "tiny", ("tinyb", "tinyc"), 1) in bpr and ("uni29", "tinyb", ("tinyc",), 2) in bpr
    assert len(bpr) == 2 * 2 * 2 * 2
    merge = by("GRU4Rec")
    assert len(merge) == 2 and all(c["config"]["merge_domains"] == ["tiny", "tinyb"] for c in merge)
    sas = by("SASRec")[0]["config"]
    assert sas["epochs"] == 2 and sas["eval_mode"] == "uni29" and sas["data_path"] == str(data)
    assert all(c["config"]["sample_seed"] == 2020 for c in cells)  # one candidate seed for the whole table
    assert len({c["hash"] for c in cells}) == len(cells)


@pytest.mark.parametrize("over, match", [
    ({"epochs": 3}, "unknown key 'epochs'"),
    ({"models": ["NoSuchModel"]}, "unknown model 'NoSuchModel'"),
    ({"models": [{"model": "EASE", "config": {"seed": 3}}]}, "seed cannot be set per model"),
    ({"models": [{"model": "EASE", "config": {"topk": [5]}}]}, "topk cannot be set per model"),
    ({"models": [{"model": "EASE", "lr": 1}]}, "unknown key 'lr' in models"),
    ({"models": ["EASE", "EASE"]}, "label 'EASE' used twice"),
    ({"models": ["EASE", {"model": "EASE", "label": "E2"}]}, "same model with the same config"),
    ({"protocols": ["full", "uni"]}, "protocol 'uni'"),
    ({"datasets": ["tiny", "nope"]}, "dataset 'nope' not found"),
    ({"models": [{"model": "BPR", "source_domains": ["nope"]}]}, "dataset 'nope' not found"),
    ({"seeds": [1, "2"]}, "seeds must be"),
    ({"protocols": ["uni0"]}, "protocol 'uni0'"),
    ({"protocols": ["uni-5"]}, "protocol 'uni-5'"),
    ({"seeds": [1, 2**32]}, "seeds has 4294967296: seeds must be integers from 0 to 4294967295"),
    ({"seeds": [-1]}, "seeds has -1"),
    ({"sample_seed": -3}, "sample_seed must be an integer"),
    ({"models": [{"model": "EASE", "config": {"eval_sample_seed": 3}}]}, "eval_sample_seed cannot be set per model"),
    ({"config": {"eval_sample_seed": 3}}, "config.eval_sample_seed is set by the grid; use the top-level sample_seed"),
])
def test_bad_config_refused(data, tmp_path, over, match):
    with pytest.raises(LeaderboardConfigError, match=match):
        board(data, tmp_path, **over)


def test_cli_bad_config_one_line_exit_2(data, tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"data_path": str(data), "datasets": ["tiny"], "protocols": ["full"],
                                    "models": ["EASE", "NotAModel"]}))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "NotAModel" in err and "\n" not in err
    assert not (tmp_path / "leaderboards").exists()  # nothing written


def test_registered_but_missing_model_is_skipped_only_when_optional(data, tmp_path, monkeypatch):
    from recbole_weaverec import registry

    monkeypatch.setitem(registry.MODELS, "FutureRec", "recbole_weaverec.model.not_there:FutureRec")
    with pytest.raises(LeaderboardConfigError, match="optional: true"):
        board(data, tmp_path, models=["EASE", "FutureRec"])
    cfg = board(data, tmp_path, models=["EASE", {"model": "FutureRec", "optional": True}])
    runner = FakeRunner()
    b = Leaderboard(cfg, runner=runner)
    assert b.run() == 0
    assert len(runner.calls) == 2 * 2 * 2  # EASE only
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    assert {r["status"] for r in rows if r["model"] == "FutureRec"} == {"skipped"}
    assert "Not run yet (or not installed): FutureRec." in (tmp_path / "out" / "results.md").read_text()


def test_cache_second_run_computes_nothing(data, tmp_path):
    cfg = board(data, tmp_path)
    first = FakeRunner()
    assert Leaderboard(cfg, runner=first).run() == 0
    assert len(first.calls) == 2 * 2 * 2 * 2
    second = FakeRunner()
    assert Leaderboard(cfg, runner=second).run() == 0
    assert second.calls == []
    # a changed setting of one model reruns only that model's cells
    cfg2 = board(data, tmp_path, models=[{"model": "EASE", "config": {"reg_weight": 10.0}}, "Pop"])
    third = FakeRunner()
    Leaderboard(cfg2, runner=third).run()
    assert len(third.calls) == 2 * 2 * 2
    # presentation-only settings do not invalidate the cache
    cfg3 = board(data, tmp_path, models=[{"model": "EASE", "config": {"reg_weight": 10.0, "show_progress": True}},
                                         "Pop"])
    fourth = FakeRunner()
    Leaderboard(cfg3, runner=fourth).run()
    assert fourth.calls == []


def test_interrupted_run_resumes_with_the_missing_cells(data, tmp_path):
    cfg = board(data, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        Leaderboard(cfg, runner=FakeRunner(interrupt_after=5)).run()
    rest = FakeRunner()
    Leaderboard(cfg, runner=rest).run()
    assert len(rest.calls) == 16 - 5
    b = Leaderboard(cfg, runner=FakeRunner())
    assert b.run(only=["Pop"]) == 0 and b.runner.calls == []


def test_failed_cells_do_not_stop_the_grid_and_are_retried(data, tmp_path):
    cfg = board(data, tmp_path, models=["EASE", {"model": "EASE", "label": "EASE-bad", "config": {"reg_weight": 1}},
                                        "Pop"])
    runner = FakeRunner(fail_label="EASE-bad")
    assert Leaderboard(cfg, runner=runner).run() == 8  # the exit code: number of failed cells
    assert len(runner.calls) == 24
    rows = list(csv.DictReader(open(tmp_path / "out" / "results.csv")))
    bad = [r for r in rows if r["label"] == "EASE-bad"]
    assert all(r["status"] == "failed" and r["error"].startswith("ConfigError: reg_weight") for r in bad)
    assert all(r["status"] == "ok" and r["NDCG@10"] for r in rows if r["label"] != "EASE-bad")
    retry = FakeRunner()
    assert Leaderboard(cfg, runner=retry).run() == 0  # failures are not cached: a rerun tries them again
    assert len(retry.calls) == 8


def _row(label, seed, ndcg, status="ok", dataset="d1", error=""):
    return {"protocol": "full", "model": label, "label": label, "dataset": dataset, "sources": "-", "seed": seed,
            "status": status, "error": error, "wall_s": 1.0, "history": "train+valid", "model_type": "GENERAL",
            "valid_score": "", "hash": "h", "metrics": {"ndcg@10": ndcg, "hit@10": ndcg * 2} if status == "ok" else {}}


def test_markdown_mean_std_and_bold_best():
    rows = [_row("A", 1, 0.2), _row("A", 2, 0.4), _row("B", 1, 0.25), _row("B", 2, 0.25),
            _row("C", 1, 0.9, dataset="d2"), _row("C", 1, 0, status="failed", error="RuntimeError: boom"),
            _row("D", 1, 0, status="pending")]
    md = render_markdown(rows, now="2026-01-01 00:00 UTC")
    table = md[md.index("### `full` · d1"):md.index("### `full` · d2")]
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines() if ln.startswith("| ")}
    # A: mean 0.3, sample std 0.1414 -> best NDCG@10 in bold; B: 0.25 ± 0
    assert "**0.3000 ± 0.1414**" in lines["A"] and "**0.6000 ± 0.2828**" in lines["A"]
    assert "0.2500 ± 0.0000" in lines["B"] and "**" not in lines["B"]
    assert "| failed |" in lines["C"] and "- C: RuntimeError: boom" in table
    assert "| 0/1 |" in lines["C"] and "| 2/2 |" in lines["A"]
    assert "1 cell(s) not run yet" in md
    headline = md[md.index("Test NDCG@10:"):md.index("### `full` · d1")]
    assert "**0.9000**" in headline  # one seed: no ± ; C is the best on d2


def test_real_tiny_run_end_to_end(tmp_path, monkeypatch, capsys):
    """EASE (both protocols) + Pop + a misconfigured EASE through real subprocesses, then a cached rerun."""
    data = write_tiny_dataset(tmp_path / "data", "tiny")
    out = tmp_path / "out"
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data_path": str(data), "output_dir": str(out), "datasets": ["tiny"], "seeds": [1],
        "config": {"state": "WARNING"},
        "protocols": {"full": {"headline": "NDCG@10", "config": {"metrics": ["NDCG", "Hit"], "topk": [10]}},
                      "uni29": {"headline": "NDCG@5", "config": {"metrics": ["NDCG", "MRR"], "topk": [1, 5],
                                                                  "valid_metric": "NDCG@5"}}},
        "models": ["EASE", {"model": "Pop", "protocols": ["full"]},
                   {"model": "EASE", "label": "EASE-bad", "protocols": ["full"],
                                   "config": {"reg_weight": "abc"}}]}))
    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(path), "--quiet"]) == 1  # one failed cell
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and all(0 <= float(r["NDCG@10" if r["protocol"] == "full" else "NDCG@5"]) <= 1 for r in ok)
    assert {r["model"]: r["history"] for r in ok} == {"EASE": "train+valid", "Pop": "train"}
    bad = next(r for r in rows if r["label"] == "EASE-bad")
    assert bad["status"] == "failed" and "reg_weight" in bad["error"] and "\n" not in bad["error"]
    md = (out / "results.md").read_text()
    assert "## Protocol `full`" in md and "## Protocol `uni29`" in md and "**" in md
    for png in ("full_NDCG-10.png", "uni29_NDCG-5.png", "uni29_MRR-1.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "cache" / "cells").glob("*.json"))) == 3
    assert list((out / "cache" / "logs").glob("*.log"))  # RecBole's log of each cell is kept
    assert not (tmp_path / "log").exists() and not (out / "cache" / "work").exists() or \
        not list((out / "cache" / "work").iterdir())
    capsys.readouterr()
    # rerun: only the failed cell is attempted again; --dry-run shows the cache
    assert main(["--config", str(path), "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert listing.count("cached") == 1 + 3 and "to run" in listing
    calls = []
    real = lb.SubprocessRunner.__call__
    monkeypatch.setattr(lb.SubprocessRunner, "__call__", lambda self, c: calls.append(c) or real(self, c))
    assert main(["--config", str(path), "--quiet", "--only", "Pop"]) == 0  # cached: nothing runs
    assert calls == []
    assert "**" in (out / "results.md").read_text() and len(list(csv.DictReader(open(out / "results.csv")))) == 4
    (out / "results.md").unlink()
    (out / "full_NDCG-10.png").unlink()
    assert main(["--config", str(path), "--render"]) == 0 and calls == []  # outputs from the cache alone
    assert (out / "results.md").is_file() and (out / "full_NDCG-10.png").is_file()
    assert json.loads(next((out / "cache" / "cells").glob("*.json")).read_text())["status"] == "ok"
    codes = [json.loads(p.read_text())["code"] for p in (out / "cache" / "cells").glob("*.json")]
    assert all("quick_start.py" in c and "model/llm/llmrec.py" not in c and "model/llm/scoring.py" not in c
               for c in codes)  # an EASE or Pop cell never runs the LLM code: editing it keeps these cells
    assert any("model/lae/ease.py" in c for c in codes)
    assert not any("leaderboard/report.py" in c for c in codes)  # presentation code never invalidates a cell


def _record_candidates(monkeypatch):
    """``seen``: append a list before each run; it gets the (phase, user, item) of every uniN evaluation batch."""
    from recbole.data.dataloader.general_dataloader import NegSampleEvalDataLoader

    seen, orig = [], NegSampleEvalDataLoader.collate_fn

    def record(self, index):
        out = orig(self, index)
        users, items = out[0][self.uid_field].tolist(), out[0][self.iid_field].tolist()
        seen[-1].extend((self._sampler.phase, u, i) for u, i in zip(users, items))
        return out

    monkeypatch.setattr(NegSampleEvalDataLoader, "collate_fn", record)
    return seen


def test_uni29_candidates_identical_across_models(tmp_path, monkeypatch):
    """Every model of a uni29 table ranks the same sampled candidates, whatever its training consumed; with
    eval_sample_users, of the same users (drawn from sample_seed via eval_sample_seed, not the training seed)."""
    data = write_tiny_dataset(tmp_path / "data", "tiny")
    monkeypatch.chdir(tmp_path)
    seen = _record_candidates(monkeypatch)

    def candidates(model, sample_seed=2020, seed=1, users=None, phases=("test",), **config):
        protocols = {"uni29": {"config": {"eval_sample_users": users}}}
        cfg = validate_config({"data_path": str(data), "output_dir": str(tmp_path / "o"), "datasets": ["tiny"],
                               "seeds": [seed], "sample_seed": sample_seed, "protocols": protocols,
                               "models": [{"model": model, "config": {"epochs": 2, "state": "WARNING", **config}}]})
        cell = expand_grid(cfg)[0]
        seen.append([])
        row = lb.run_cell(cell)
        assert row["status"] == "ok", row["error"]
        assert cell["config"]["eval_sample_seed"] == sample_seed
        return sorted(t for t in seen[-1] if t[0] in phases)

    ease = candidates("EASE")
    assert len(ease) == 40 * 30  # one test pass: the per-user values come from its own scores
    assert candidates("BPR") == ease  # BPR's training draws negatives from the same numpy stream
    assert candidates("GRU4Rec", hidden_size=8, embedding_size=8) == ease  # sequential dataset, same split
    assert candidates("BPR", seed=2) == ease  # another training seed, same candidates
    assert candidates("EASE", sample_seed=7) != ease
    both = ("valid", "test")  # Pop: one epoch, one validation
    pop = candidates("Pop", seed=2021, users=10, phases=both, epochs=1)
    assert pop == candidates("Pop", seed=2022, users=10, phases=both, epochs=1) and len(pop) == 2 * 10 * 30
    assert [len({u for p, u, _ in pop if p == phase}) for phase in both] == [10, 10]  # 10 users x 30 items each


def _shipped(name, monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)  # data_path in the shipped configs is relative to the repository root
    cfg = lb.load_config(REPO / "leaderboards" / name)
    return cfg, expand_grid(cfg)


def test_shipped_sample_board_is_valid(monkeypatch):
    cfg, cells = _shipped("sample.yaml", monkeypatch)
    assert set(cfg["protocols"]) == {"full", "uni29"}
    models = {c["model"] for c in cells}
    assert {"EASE", "RLAE", "RDLAE", "recbole:EASE", "Pop", "BPR", "LightGCN", "GRU4Rec", "SASRec",
            "BERT4Rec"} <= models
    # the candidates of a table come from one seed for every cell
    assert {c["config"]["sample_seed"] for c in cells} == {cfg["sample_seed"]}


@needs_shared_data()
def test_shipped_amazon_board_is_valid(monkeypatch):
    cfg, cells = _shipped("amazon.yaml", monkeypatch)
    assert cfg["datasets"] == ["amazon-beauty", "amazon-sports", "amazon-toys", "amazon-pantry"]
    for name in ("SASRec", "BERT4Rec", "GRU4Rec", "BPR", "LightGCN", "recbole:EASE", "EASE", "RLAE", "RDLAE"):
        assert {c["protocol"] for c in cells if c["model"] == name} == {"full", "uni29"}
    llm = [c for c in cells if c["model"] in ("LLMRec", "LLMJoint", "LLMMerge", "WeaveRec")]
    assert all(c["protocol"] == "uni29" for c in llm)
    weave = [c for c in cells if c["model"] == "WeaveRec"]
    assert all(c["dataset"] not in c["sources"] and len(c["sources"]) == 3 for c in weave)
    uni = [c for c in cells if c["protocol"] == "uni29"]
    assert len({c["config"]["eval_sample_users"] for c in uni}) == 1  # the same users for every model


def test_recbole_graph_builtin_runs(tiny_data, run_dir):
    """LightGCN (a board built-in) builds its adjacency with scipy's removed dok_matrix._update: compat restores it."""
    from recbole_weaverec.quick_start import run

    result = run("LightGCN", "tiny", config_dict={"data_path": str(tiny_data), "epochs": 1, "state": "WARNING"})
    assert 0 <= result["test_result"]["ndcg@10"] <= 1


def test_plain_run_users_follow_seed_unless_eval_sample_seed(tiny_data, run_dir):
    from recbole_weaverec.quick_start import _sample_eval_users, build_config, prepare

    def users(**extra):
        config = build_config("Pop", "tiny", config_dict={"data_path": str(tiny_data), "eval_mode": "uni29",
                                                          "state": "WARNING", "eval_sample_users": 7, **extra})
        _, _, valid, test = prepare(config)
        return [sorted(set(d._dataset.inter_feat[config["USER_ID_FIELD"]].tolist())) for d in (valid, test)]

    plain = users(seed=1)
    assert len(plain[1]) == 7 and plain != users(seed=2)  # unchanged: without eval_sample_seed, seed draws them
    assert users(seed=1, eval_sample_seed=5) == users(seed=2, eval_sample_seed=5) != plain  # set: the same users
    assert users(seed=2, eval_sample_seed=1) == plain
    for bad in (-1, 2**32, "7", True, 1.5):  # checked even where eval_sample_users is null
        with pytest.raises(ConfigError) as e:
            _sample_eval_users({"seed": 1, "eval_sample_users": None, "eval_sample_seed": bad}, None)
        assert str(e.value) == f"eval_sample_seed={bad!r} is not allowed: expected an integer from 0 to 4294967295 " \
                               f"or null (use seed)"


def test_cli_sample_seed_overrides_the_yaml(data, tmp_path, capsys):
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump({"data_path": str(data), "output_dir": str(tmp_path / "o"), "datasets": ["tiny"],
                                    "sample_seed": 3, "protocols": ["uni29"], "models": ["Pop"]}))
    (cell,) = expand_grid(lb.load_config(path, sample_seed=7))
    assert cell["config"]["sample_seed"] == cell["config"]["eval_sample_seed"] == 7
    assert cell["hash"] != expand_grid(lb.load_config(path))[0]["hash"]
    assert main(["--config", str(path), "--dry-run", "--sample-seed", "7"]) == 0
    assert f" {cell['hash']}  to run" in capsys.readouterr().out
    assert main(["--config", str(path), "--sample-seed", "abc"]) == 2
    assert capsys.readouterr().err.strip() == "error: --sample-seed must be an integer from 0 to 4294967295, got 'abc'"


def test_cell_hash_covers_defaults_data_and_code(data, tmp_path, monkeypatch):
    _hashes = lambda cfg: {(c["protocol"], c["label"], c["dataset"], c["seed"]): c["hash"]  # noqa: E731
                           for c in expand_grid(cfg)}
    reads, real = collections.Counter(), fingerprint._hash_contents
    monkeypatch.setattr(fingerprint, "_DIGESTS", {})
    monkeypatch.setattr(fingerprint, "_hash_contents", lambda p: reads.update([str(p)]) or real(p))
    cfg = board(data, tmp_path)  # 16 cells
    before = _hashes(cfg)
    assert set(reads.values()) == {1} and sum("tiny.inter" in p for p in reads) == 1  # each file read once
    assert _hashes(board(data, tmp_path, config={"show_progress": True, "state": "ERROR"})) == before
    edited = before  # (defaults and code are checked beside the key: test_cells_are_recomputed_only_when_...)
    # one byte of a data file, with the same size and mtime: the cells of that dataset
    inter = data / "tiny" / "tiny.inter"
    raw, st = bytearray(inter.read_bytes()), inter.stat()
    raw[-2] ^= 1  # the last digit of the last line
    inter.write_bytes(raw)
    os.utime(inter, ns=(st.st_atime_ns, st.st_mtime_ns))
    monkeypatch.setattr(fingerprint, "_DIGESTS", {})  # a new process: the contents are read again
    after = _hashes(cfg)
    assert {k for k in before if after[k] != edited[k]} == {k for k in before if k[2] == "tiny"}
    shutil.rmtree(data / "tinyb")  # a missing dataset: hashed as such, the cell fails later with its own error
    gone = _hashes(cfg)
    assert {k for k in before if gone[k] != after[k]} == {k for k in before if k[2] == "tinyb"}
    assert fingerprint.versions().startswith(f"recbole_weaverec {__version__}; recbole ")


def test_cells_are_recomputed_only_when_code_they_ran_changes(tiny_data, tmp_path, monkeypatch):
    """A cell records the package files its process imported and the defaults its config looked for; editing one of
    them (and only those), or adding a default it looked for, recomputes it."""
    from recbole_weaverec import config as config_module
    from recbole_weaverec.quick_start import build_config

    monkeypatch.setattr(config_module, "DEFAULTS_READ", set())  # as in a cell's own process: this config only
    build_config("EASE", "tiny", config_dict={"data_path": str(tiny_data)})
    loaded = fingerprint.loaded_code()
    assert {"model/lae/ease.py", "quick_start.py", "properties/overall.yaml", "properties/model/EASE.yaml"} <= set(
        loaded) and loaded["properties/dataset/tiny.yaml"] == "unreadable"  # looked for, absent
    assert "properties/model/MergeRec.yaml" not in loaded and "leaderboard/report.py" not in loaded
    copy = tmp_path / "pkg"
    top = str(fingerprint.PACKAGE)  # the package without its bundled sample data and caches
    shutil.copytree(fingerprint.PACKAGE, copy, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or (d == top and n == "dataset")])
    code = {k: loaded[k] for k in ("model/lae/ease.py", "quick_start.py", "properties/model/EASE.yaml",
                                   "properties/dataset/tiny.yaml")}
    monkeypatch.setattr(fingerprint, "PACKAGE", copy)
    assert fingerprint.code_unchanged(code)
    (copy / "model/llm/llmrec.py").write_text("# edited\n", encoding="utf-8")  # not run by this cell
    (copy / "properties/model/MergeRec.yaml").write_text("merge_lr: 1\n", encoding="utf-8")  # not read by it
    assert fingerprint.code_unchanged(code)
    (copy / "properties/dataset/tiny.yaml").write_text("x: 1\n", encoding="utf-8")  # a default it looked for
    assert not fingerprint.code_unchanged(code)
    (copy / "properties/dataset/tiny.yaml").unlink()
    assert fingerprint.code_unchanged(code)
    ease = copy / "properties/model/EASE.yaml"
    original = ease.read_text()
    ease.write_text(original.replace("reg_weight: 250.0", "reg_weight: 25.0"))
    assert not fingerprint.code_unchanged(code)
    ease.write_text(original)
    assert fingerprint.code_unchanged(code)
    (copy / "model/lae/ease.py").write_text("# edited\n", encoding="utf-8")
    assert not fingerprint.code_unchanged(code)
    assert not fingerprint.code_unchanged({}) and not fingerprint.code_unchanged(None)  # rows of older versions
    assert not fingerprint.code_unchanged({"gone.py": "x"})
