"""RecBole's own HyperTuning (issue 18.1): our objective_function runs our models and RecBole's, and a params file's
`choice` lines are literals, never code."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from recbole.trainer import HyperTuning

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.quick_start import objective_function

from conftest import REPO, write_tiny_dataset

QUIET = "state: WARNING\nshow_progress: false\n"
# RecBole derives valid_metric_bigger from valid_metric (a user's own value is overwritten): a search that minimises
# needs a smaller-is-better metric, LogLoss of a CTR model (RecBole's LR) on labelled interactions
LABELLED = "load_col: {inter: [user_id, item_id, timestamp, label]}\neval_args: {mode: labeled}\n" \
           "metrics: [AUC, LogLoss]\nvalid_metric: LogLoss\nepochs: 1\n"


@pytest.fixture
def fixed(run_dir):
    """A tiny dataset and the fixed config file naming it (run_dir: logs and checkpoints go to tmp_path)."""
    data = write_tiny_dataset(run_dir / "data")
    inter = data / "tiny" / "tiny.inter"
    header, *rows = inter.read_text().splitlines()
    inter.write_text("\n".join([header + "\tlabel:float"] + [f"{r}\t{int(i % 3 > 0)}" for i, r in enumerate(rows)]))

    def write(model, extra=""):
        path = run_dir / "fixed.yaml"
        path.write_text(f"model: {model}\ndataset: tiny\ndata_path: {data}\n{QUIET}{extra}")
        return [str(path)]
    return write


def params_file(run_dir, text):
    path = run_dir / "params.hyper"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("model,name,values,extra,metric,bigger", [
    ("EASE", "reg_weight", (1.0, 5000.0), "", "ndcg@10", True),  # valid NDCG@10 0.4393 and 0.4204
    ("LR", "learning_rate", (0.001, 0.1), LABELLED, "logloss", False),  # valid LogLoss 0.7289 and 0.7131
])
def test_exhaustive_search_tries_both_and_keeps_the_better(fixed, run_dir, model, name, values, extra, metric,
                                                           bigger):
    """Both values are tried, and the best is the one that scores better in the direction the config says."""
    hp = HyperTuning(objective_function, algo="exhaustive",
                     params_file=params_file(run_dir, f"{name} choice {list(values)}\n"),
                     fixed_config_file_list=fixed(model, extra))
    hp.run()
    assert sorted(hp.params2result) == [f"{name}:{v}" for v in values]
    scores = {v: hp.params2result[f"{name}:{v}"]["best_valid_score"] for v in values}
    assert scores[values[0]] != scores[values[1]]  # else any pick would pass
    assert hp.best_params == {name: (max if bigger else min)(scores, key=scores.get)}
    for result in hp.params2result.values():
        assert result["model"] == model and result["valid_score_bigger"] is bigger
        assert result["best_valid_score"] == result["best_valid_result"][metric]
        assert set(result["test_result"]) == set(result["best_valid_result"]) and metric in result["test_result"]


@pytest.mark.parametrize("model,params,module", [
    ("BPR", "learning_rate choice [0.01]\nepochs choice [1]\n", "recbole.model.general_recommender.bpr:BPR"),
    # RecBole's EASE, which ours shadows: the trial must not run ours
    ("recbole:EASE", "reg_weight choice [250.0]\n", "recbole.model.general_recommender.ease:EASE"),
])
def test_recboles_own_model_in_one_trial(fixed, run_dir, model, params, module):
    hp = HyperTuning(objective_function, algo="exhaustive", params_file=params_file(run_dir, params),
                     fixed_config_file_list=fixed(model))
    hp.run()
    (result,) = hp.params2result.values()
    assert result["model"] == model.split(":")[-1] and result["test_result"]["hit@20"] > 0
    (checkpoint,) = (run_dir / "saved").glob("*.pth")
    assert torch.load(checkpoint, weights_only=True)["model_class"] == module


@pytest.mark.parametrize("values", [
    "__import__('os').system('touch\\x20PWNED')",  # (RecBole joins the fields: no space in the line's value)
    "[1,open('PWNED','w')]",
    "[__import__('pathlib').Path('PWNED').touch()]",
])
def test_choice_line_is_never_evaluated(fixed, run_dir, values):
    path = params_file(run_dir, f"embedding_size choice [64]\nreg_weight choice {values}\n")
    with pytest.raises(ConfigError) as e:
        HyperTuning(objective_function, params_file=path, fixed_config_file_list=fixed("EASE"))
    message = str(e.value)
    assert "\n" not in message and path in message and "reg_weight" in message and repr(values) in message
    assert "literal list" in message
    assert not (run_dir / "PWNED").exists()


def test_non_choice_lines_keep_recboles_meaning(run_dir):
    from hyperopt.pyll.stochastic import sample

    space = HyperTuning._build_space_from_file(params_file(run_dir, (
        "learning_rate loguniform -8,0\nreg_weight uniform 1,10\nembedding_size quniform 16,64,16\n"
        "too short\n\nmlp choice ['[64,64]','[128]']\n")))
    assert set(space) == {"learning_rate", "reg_weight", "embedding_size", "mlp"}
    point = sample(space, rng=np.random.default_rng(0))
    assert 0 < point["learning_rate"] <= 1 and 1 <= point["reg_weight"] <= 10
    assert point["embedding_size"] in (16.0, 32.0, 48.0, 64.0) and point["mlp"] in ("[64,64]", "[128]")


def test_patches_hold_whichever_is_imported_first():
    """A user script that imports RecBole's HyperTuning before this package still gets both patches."""
    code = ("from recbole.trainer import HyperTuning\nfrom recbole.trainer import hyper_tuning\n"
            "import recbole_weaverec\nfrom recbole_weaverec import patches, safe\n"
            "assert HyperTuning._build_space_from_file is safe._space_from_file\n"
            "assert hyper_tuning.exhaustive_search is patches._exhaustive_search\n")
    subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=REPO, check=True, timeout=120)
