"""No code runs from data files or config values (issue 12, security). Each attack, if it worked, would create a
marker file; every test checks the marker is absent and the run either went on safely or stopped in one line."""
import os
import pickle
import subprocess
import sys

import pytest

from recbole_weaverec.config import ConfigError
from recbole_weaverec.quick_start import build_config, run
from recbole_weaverec.safe import parse_value

from conftest import REPO

FAST = {"show_progress": False, "state": "WARNING"}


class _Planted:
    """Unpickling this runs ``open(marker, 'w')``: the attack a planted .pth file carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(_Planted(marker), f)


@pytest.mark.parametrize("model,file", [
    ("EASE", "saved/tiny-Dataset.pth"),
    ("SASRec", "saved/tiny-SequentialDataset.pth"),
    ("EASE", "saved/tiny-for-EASE-dataloader.pth"),
    ("EASE", "custom/dataset.pth"),  # dataset_save_path
    ("EASE", "custom/loaders.pth"),  # dataloaders_save_path
])
def test_planted_saved_files_are_never_unpickled(tiny_data, run_dir, model, file):
    marker = run_dir / "PWNED"
    _plant(run_dir / file, marker)
    config = {"data_path": str(tiny_data), "epochs": 1, **FAST}
    if file.startswith("custom/dataset"):
        config["dataset_save_path"] = str(run_dir / file)
    if file.startswith("custom/loaders"):
        config["dataloaders_save_path"] = str(run_dir / file)
    result = run(model, "tiny", config_dict=config)
    assert not marker.exists(), f"{file} was unpickled"
    assert result["test_result"]  # the run rebuilt the dataset from the atomic files and went on


def test_saved_dataset_is_rebuilt_not_loaded(tiny_data, run_dir):
    """save_dataset still writes RecBole's file; the next run ignores it and scores the same."""
    config = {"data_path": str(tiny_data), "save_dataset": True, "save_dataloaders": True, **FAST}
    first = run("EASE", "tiny", config_dict=config)
    assert (run_dir / "saved" / "tiny-Dataset.pth").is_file()
    second = run("EASE", "tiny", config_dict=config)
    assert first["test_result"] == second["test_result"]


EXPRESSIONS = [
    "__import__('os').system('touch {m}') or 100",
    "open('{m}', 'w') and 100",
    "[open('{m}', 'w')]",
    "(lambda: open('{m}', 'w'))()",
    "getattr(__builtins__, 'open')('{m}', 'w')",
]


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_config_string_is_never_evaluated(tiny_data, run_dir, expr):
    marker = run_dir / "PWNED"
    value = expr.format(m=marker)
    for kwargs in ({"cmd_args": [f"--reg_weight={value}"]},
                   {"config_dict": {"reg_weight": value}},
                   {"config_dict": {"tie_break": value}}):  # a leaderboard YAML cell passes a config_dict
        kwargs.setdefault("config_dict", {})["data_path"] = str(tiny_data)
        with pytest.raises(ConfigError, match="looks like code") as e:
            build_config("EASE", "tiny", **kwargs)
        assert "\n" not in str(e.value)
    assert not marker.exists()


def test_cli_refuses_code_in_one_line(tiny_data, run_dir):
    marker = run_dir / "PWNED"
    out = subprocess.run(
        [sys.executable, str(REPO / "run_recbole_weaverec.py"), "--model=EASE", "--dataset=tiny",
         f"--data_path={tiny_data}", f"--reg_weight=__import__('os').system('touch {marker}') or 100"],
        capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: reg_weight=") and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("text", ["1/0", "().x", "2**10", "1e-3*2"])
def test_computed_values_are_one_line_errors(text):
    with pytest.raises(ConfigError, match="expression, not a value|looks like code") as e:
        parse_value("reg_weight", text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,value", [
    ("100", 100), ("1e-3", 0.001), ("-2.5", -2.5), ("[1, 2]", [1, 2]), ("True", True), ("true", True),
    ("FALSE", False), ("None", None), ("{'a': 1}", {"a": 1}), ("'x(y)'", "x(y)"),
    ("amazon-toys", "amazon-toys"), ("uni29", "uni29"), ("../shared/data", "../shared/data"),
    ("data/foo", "data/foo"), ("a.yaml", "a.yaml"), ("[amazon-beauty,amazon-sports]", ["amazon-beauty", "amazon-sports"]),
    ("[title, brand]", ["title", "brand"]), ("[Recall,NDCG]", ["Recall", "NDCG"]), ("[5, x]", [5, "x"]),
    ("sum", "sum"), ("Title: {title}", "Title: {title}"), ("none", "none"),
])
def test_literals_and_words_parse_as_recbole_did(text, value):
    assert parse_value("k", text) == value


def test_yaml_python_tags_refused_in_one_line(tiny_data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("reg_weight: !!python/name:os.system\n")
    with pytest.raises(ConfigError, match="bad.yaml") as e:
        build_config("EASE", "tiny", config_file_list=[str(bad)], config_dict={"data_path": str(tiny_data)})
    assert "\n" not in str(e.value)
    apply = tmp_path / "apply.yaml"
    apply.write_text(f"reg_weight: !!python/object/apply:os.system ['touch {tmp_path / 'PWNED'}']\n")
    with pytest.raises(ConfigError, match="apply.yaml"):
        build_config("EASE", "tiny", config_file_list=[str(apply)], config_dict={"data_path": str(tiny_data)})
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content", ["- a\n- b\n", "just a string\n", "a: [1, 2\n"])
def test_malformed_or_non_mapping_yaml_named(tiny_data, tmp_path, content):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError, match="c.yaml") as e:
        build_config("EASE", "tiny", config_file_list=[str(f)], config_dict={"data_path": str(tiny_data)})
    assert "\n" not in str(e.value)


def test_hyper_parameter_file_is_not_evaluated(tmp_path):
    from recbole.trainer.hyper_tuning import HyperTuning

    marker = tmp_path / "PWNED"
    params = tmp_path / "hyper.test"
    params.write_text(f"learning_rate choice [__import__('os').system('touch {marker}')]\n")
    with pytest.raises(ConfigError, match="hyper.test:1"):
        HyperTuning._build_space_from_file(str(params))
    assert not marker.exists()


def test_recbole_model_eval_keys_checked(tiny_data, tmp_path):
    """KD_DAGFM eval()s its 'teacher' key; only a class name passes."""
    from recbole_weaverec.safe import check_model_specific

    marker = tmp_path / "PWNED"
    with pytest.raises(ConfigError, match="teacher="):
        check_model_specific({"model": "KD_DAGFM", "teacher": f"__import__('os').system('touch {marker}')"})
    check_model_specific({"model": "KD_DAGFM", "teacher": "DCNV2"})
    assert not marker.exists()
