"""The board's committed archive (OUTPUT_DIR/cells, OUTPUT_DIR/tuned): a board computed on one machine renders and
resumes on another whose cache is empty, under the cache's own code rule; a bad archived file is named and redone."""
import csv
import gzip
import json
import math
import random
import shutil

from recbole_weaverec.leaderboard import Leaderboard, validate_config
from recbole_weaverec.leaderboard.archive import Archive
from recbole_weaverec.leaderboard.fingerprint import loaded_code

from conftest import write_tiny_dataset


class Runner:
    """Valid score peaks at reg_weight=100; every call is recorded."""

    def __init__(self, seed=0):
        self.calls, self.rng = [], random.Random(seed)

    def __call__(self, cell):
        self.calls.append(cell)
        lam = cell["config"].get("reg_weight", 250)
        valid = 0.5 - abs(math.log10(lam) - 2) * 0.1 + 0.001 * cell["seed"]
        return {"status": "ok", "error": "", "metrics": {"ndcg@10": self.rng.random()}, "wall_s": 0.1,
                "history": "train", "model_type": "GENERAL", "valid_score": valid, "code": loaded_code(),
                "per_user": {"users": ["1", "2"], "metrics": {"ndcg@10": [self.rng.random(), 0.0]}}}


def board(tmp_path, **over):
    data = tmp_path / "data"
    if not (data / "tiny").is_dir():
        write_tiny_dataset(data, "tiny", seed=0)
    raw = {"data_path": str(data), "output_dir": str(tmp_path / "out"), "datasets": ["tiny"], "seeds": [1, 2],
           "protocols": ["full"], "tuning": {"trials": 3, "seed": 7},
           "models": [{"model": "EASE", "tune": {"params": {"reg_weight": "choice [10,100,1000]"}}}, "Pop"]}
    raw.update(over)
    return validate_config({k: v for k, v in raw.items() if v is not None})


def _table(tmp_path):
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_new_machine_renders_and_resumes_from_the_archive(tmp_path):
    cfg = board(tmp_path)
    first = Runner()
    assert Leaderboard(cfg, runner=first).run() == 0
    out = tmp_path / "out"
    shown = {c["hash"] for c in first.calls if c["model"] == "Pop" or c["seed"] == 2 or
             c["config"].get("reg_weight") == 100}
    assert {p.name[:-8] for p in (out / "cells").glob("*.json.gz")} == shown  # the shown cells, not the trials
    assert len(list((out / "tuned").glob("tune-*.json"))) == 1
    table = _table(tmp_path)
    shutil.rmtree(out / "cache")  # another machine: the repository's files only
    again = Runner(seed=5)
    b = Leaderboard(cfg, runner=again)
    assert b.run() == 0 and again.calls == []  # nothing recomputed, no search repeated
    assert _table(tmp_path) == table
    assert {r["tuning"] for r in b.rows() if r["model"] == "EASE"} == {"tuned: 3 trials"}
    # a new seed on the new machine runs with the archived choice, without searching again
    more = Runner()
    Leaderboard(board(tmp_path, seeds=[1, 2, 3]), runner=more).run()
    assert [(c["model"], c["seed"], c["config"].get("reg_weight")) for c in more.calls] == [
        ("EASE", 3, 100), ("Pop", 3, None)]


def test_archive_bytes_are_stable_and_a_render_on_other_data_removes_nothing(tmp_path):
    cfg = board(tmp_path)
    Leaderboard(cfg, runner=Runner()).run()
    files = sorted((tmp_path / "out").glob("cells/*.json.gz")) + sorted((tmp_path / "out").glob("tuned/*.json"))
    before = {p: p.read_bytes() for p in files}
    Leaderboard(cfg, runner=Runner()).write_outputs()
    assert {p: p.read_bytes() for p in files} == before  # rewritten identically: git sees no change
    assert json.loads(gzip.decompress(files[0].read_bytes()))["status"] == "ok"
    write_tiny_dataset(tmp_path / "data", "tiny", seed=1)  # other data here: every cell's hash changes, all pending
    b = Leaderboard(board(tmp_path), runner=Runner())
    b.write_outputs()
    assert [r["status"] for r in b.rows()] == ["pending"] * 4
    assert {p: p.read_bytes() for p in files} == before


def test_archived_cells_follow_the_code_rule_and_bad_files_are_named(tmp_path, capsys):
    cfg = board(tmp_path, models=["Pop"], tuning=None)
    Leaderboard(cfg, runner=Runner()).run()
    shutil.rmtree(tmp_path / "out" / "cache")
    archive = Archive(tmp_path / "out")
    one, two = sorted((tmp_path / "out" / "cells").glob("*.json.gz"))
    stale = archive.get(one.name[:-8])
    stale["code"] = {**stale["code"], "model/abstract.py": "edited"}  # ran code that has changed since
    one.write_bytes(gzip.compress(json.dumps(stale).encode()))
    two.write_bytes(b"not gzip")
    runner = Runner()
    assert Leaderboard(cfg, runner=runner).run() == 0
    assert sorted(c["hash"] for c in runner.calls) == sorted([one.name[:-8], two.name[:-8]])
    err = capsys.readouterr().err
    assert f"archived cell {two} is unreadable" in err and str(one) not in err
    assert all(archive.get(p.name[:-8])["code"] == loaded_code() for p in (one, two))  # replaced by the new rows


def test_columns_follow_the_protocol_metrics_not_the_key_order_of_a_cell_file():
    from recbole_weaverec.leaderboard.report import _columns

    stored = {"metrics": dict.fromkeys(["ndcg@10", "ndcg@20", "ndcg@5", "recall@10", "recall@20", "recall@5"])}
    cfg = {"protocols": {"full": {"config": {"metrics": ["Recall", "NDCG"], "topk": [5, 10, 20]}}}, "config": {}}
    assert _columns(cfg, "full", {("full", "d", "EASE", ""): stored}) == [
        "recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]
    # no metrics list anywhere: names in the order they appear, k as a number (5 before 10)
    assert _columns(None, "full", {("full", "d", "EASE", ""): stored}) == [
        "ndcg@5", "ndcg@10", "ndcg@20", "recall@5", "recall@10", "recall@20"]


def test_csv_columns_follow_the_protocol_metrics(tmp_path):
    from recbole_weaverec.leaderboard.report import write_csv

    row = {"protocol": "full", "model": "EASE", "metrics": {"ndcg@10": 0.2, "ndcg@5": 0.1, "recall@5": 0.3}}
    cfg = {"protocols": {"full": {"config": {"metrics": ["Recall", "NDCG"]}}}, "config": {}}
    write_csv([row], tmp_path / "r.csv", cfg)
    with open(tmp_path / "r.csv", newline="") as f:
        header = next(csv.reader(f))
    assert [h for h in header if "@" in h] == ["Recall@5", "NDCG@5", "NDCG@10"]


class StopsAfter(Runner):
    """A Runner whose machine is switched off (SIGTERM arrives as KeyboardInterrupt) at its ``stop``-th call."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop

    def __call__(self, cell):
        if len(self.calls) + 1 == self.stop:
            raise KeyboardInterrupt
        return super().__call__(cell)


def test_a_search_stopped_on_one_machine_goes_on_from_the_archive_on_another(tmp_path):
    space = {"reg_weight": "loguniform 0,9"}  # TPE, not a grid: the replay must propose the same values again
    cfg = board(tmp_path, seeds=[1], models=[{"model": "EASE", "tune": {"params": space}}],
                tuning={"trials": 4, "seed": 7})
    stopped = StopsAfter(3)
    try:
        Leaderboard(cfg, runner=stopped).run()
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    out = tmp_path / "out"
    archived = {p.name[:-8] for p in (out / "cells").glob("*.json.gz")}
    assert archived == {c["hash"] for c in stopped.calls} and len(archived) == 2  # the finished trials, no table row
    assert list((out / "tuned").glob("*.json")) == []  # the search is not finished: no record
    assert {r["tuning"] for r in _table(tmp_path)} == {"to tune"}
    shutil.rmtree(out / "cache")  # another machine: the repository's files only
    resumed = Runner()
    Leaderboard(cfg, runner=resumed).run()
    assert len(resumed.calls) == 2 and not {c["hash"] for c in resumed.calls} & archived  # only the 2 missing trials
    # the same four trials an uninterrupted search on one machine runs
    whole = Runner()
    Leaderboard(board(tmp_path / "other", seeds=[1], models=[{"model": "EASE", "tune": {"params": space}}],
                      tuning={"trials": 4, "seed": 7}), runner=whole).run()
    assert [c["config"]["reg_weight"] for c in whole.calls] == [
        c["config"]["reg_weight"] for c in stopped.calls + resumed.calls]
    record, = [json.loads(p.read_text()) for p in (out / "tuned").glob("*.json")]
    assert record["trials"] == 4 and record["params"] in [{"reg_weight": c["config"]["reg_weight"]}
                                                          for c in whole.calls]
