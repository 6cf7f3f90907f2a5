"""Closed-form sweeps (issue 18.3): every grid point equals a separate run, G is built once, bad input is one line."""
import pytest

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.model.lae import l3ae as l3ae_module
from recbole_weaverec.model.lae.base import LinearAutoencoder
from recbole_weaverec import sweep as sweep_module
from recbole_weaverec.sweep import log_grid, sweep
from recbole_weaverec.quick_start import run

from test_twotower import make_tiny_encoder

FAST = {"state": "WARNING", "show_progress": False}  # default tie_break (popularity) and test_history (train_valid)
TOL = 1e-6


def assert_rows_equal_runs(model, rows, grid, config):
    assert [r["params"] for r in rows] == grid
    for row, point in zip(rows, grid):
        alone = run(model, "tiny", config_dict={**config, **point})
        for split, key in (("valid", "best_valid_result"), ("test", "test_result")):
            assert set(row[split]) == set(alone[key])
            for metric, value in alone[key].items():
                assert row[split][metric] == pytest.approx(float(value), abs=TOL), (point, split, metric)
        assert row["seconds"] > 0


def distinct(rows):
    """How many different (valid, test) results the grid gave: a grid whose points all score alike proves nothing."""
    return len({(tuple(sorted(r["valid"].items())), tuple(sorted(r["test"].items()))) for r in rows})


@pytest.mark.parametrize("model,grid,mode", [
    ("EASE", [{"reg_weight": v} for v in log_grid(0.5, 200.0, 3)], "full"),
    ("EASE", [{"reg_weight": v} for v in log_grid(0.5, 200.0, 3)], "uni29"),
    # points name different keys; the others fall back to config_dict's values (drop_p=0.1 below)
    ("RDLAE", [{"reg_weight": 1.0, "xi": 0.6}, {"reg_weight": 300.0}, {"xi": 0.0, "drop_p": 0.7}], "full"),
])
def test_sweep_equals_separate_runs(tiny_data, run_dir, model, grid, mode):
    config = {"data_path": str(tiny_data), "eval_mode": mode, "drop_p": 0.1, **FAST}
    if model == "EASE":
        del config["drop_p"]
    rows = sweep(model, "tiny", grid, config_dict=config)
    assert distinct(rows) == len(grid)
    assert_rows_equal_runs(model, rows, grid, config)


def test_l3ae_sweep_equals_separate_runs_and_encodes_once(tiny_data, run_dir, monkeypatch):
    encoder = make_tiny_encoder(run_dir / "tiny-bert")
    config = {"data_path": str(tiny_data), "text_encoder_path": encoder, "text_cache_dir": str(run_dir / "emb"),
              "reg_weight_x": 1.0, **FAST}
    grid = [{"reg_weight_x": -1.0, "reg_weight_e": 30.0}, {"reg_weight_x": 5.0, "reg_weight_e": 0.5},
            {"reg_weight_f": 0.05, "reg_weight_e": 30.0}, {"reg_weight_f": 0.05, "reg_weight_e": 300.0}]
    calls = {"encode": 0, "prior": 0}
    encode, prior = l3ae_module.item_text_embeddings, l3ae_module.L3AE.text_prior

    def counted_encode(*args, **kwargs):
        calls["encode"] += 1
        return encode(*args, **kwargs)

    def counted_prior(self, F):
        calls["prior"] += 1
        return prior(self, F)

    monkeypatch.setattr(l3ae_module, "item_text_embeddings", counted_encode)
    monkeypatch.setattr(l3ae_module.L3AE, "text_prior", counted_prior)
    rows = sweep("L3AE", "tiny", grid, config_dict=config)
    # one encoding; one text prior per λ_F (the default 10, then 0.05): not one per point
    assert calls == {"encode": 1, "prior": 2}
    monkeypatch.undo()
    assert distinct(rows) == len(grid)
    assert_rows_equal_runs("L3AE", rows, grid, config)


def test_gram_built_once_for_k_points(tiny_data, run_dir, monkeypatch):
    built = []
    gram = LinearAutoencoder.gram
    monkeypatch.setattr(LinearAutoencoder, "gram", lambda self: built.append(1) or gram(self))
    rows = sweep("RLAE", "tiny", [{"reg_weight": v, "xi": 0.2} for v in log_grid(1.0, 1000.0, 5)],
                 config_dict={"data_path": str(tiny_data), **FAST})
    assert len(rows) == 5 and len(built) == 1
    run("RLAE", "tiny", config_dict={"data_path": str(tiny_data), **FAST})  # a normal run keeps no G
    assert len(built) == 2


@pytest.mark.parametrize("model,grid,config,named", [
    ("EASE", [{"reg_weight": 10.0}, {"xi": 0.3}], {}, ["'xi'", "EASE", "reg_weight"]),
    ("RLAE", [{"drop_p": 0.3}], {}, ["'drop_p'", "reg_weight, xi"]),
    ("L3AE", [{"reg_weight": 10.0}], {}, ["'reg_weight'", "reg_weight_x, reg_weight_f, reg_weight_e"]),
    ("EASE", [{"reg_weight": 10.0}, {"reg_weight": -1.0}], {}, ["reg_weight", "-1.0"]),
    ("EASE", [], {}, ["grid=[]", "reg_weight"]),
    ("SASRec", [{"reg_weight": 1.0}], {}, ["'SASRec'", "EASE, RLAE, RDLAE, L3AE"]),
    ("EASE", [{"reg_weight": 10.0}], {"eval_mode": "pop20"}, ["'pop20'", "full or uni<N>"]),
])
def test_bad_sweep_input_one_line(tiny_data, run_dir, monkeypatch, model, grid, config, named):
    def loaded(config):
        raise AssertionError("the dataset was loaded before the bad input was refused")

    monkeypatch.setattr(sweep_module, "prepare", loaded)
    with pytest.raises(ConfigError) as e:
        sweep(model, "tiny", grid, config_dict={"data_path": str(tiny_data), **FAST, **config})
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in named), msg


def test_log_grid():
    assert log_grid(10, 1000, 3) == pytest.approx([10.0, 100.0, 1000.0])
    assert log_grid(5, 5, 1) == [5.0]
    for bad, named in (((0, 10, 3), "low=0"), ((10, 1, 3), "high=1"), ((1, 10, 0), "k=0"), ((1, 10, 2.5), "k=2.5")):
        with pytest.raises(ConfigError, match=named):
            log_grid(*bad)
