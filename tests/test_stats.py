"""Per-user metrics equal RecBole's means; paired bootstrap intervals see a real shift and no shift."""
import numpy as np
import pytest

from conftest import write_tiny_dataset
from recbole_weaverec.stats import paired_difference, per_user_metrics, verdict


def test_paired_difference_finds_a_shift_and_no_shift():
    rng = np.random.default_rng(0)
    a = rng.random(500)
    same = paired_difference(a, a + rng.normal(0, 0.01, 500))
    assert same["low"] < 0 < same["high"] and verdict(same) == "no difference"
    up = paired_difference(a + 0.05 + rng.normal(0, 0.01, 500), a)
    assert verdict(up) == "better" and up["low"] < 0.05 < up["high"]
    assert verdict(paired_difference(a, a + 0.05)) == "worse"  # constant difference: no spread, exact
    with pytest.raises(ValueError, match="equally long"):
        paired_difference(a, a[:10])


@pytest.mark.parametrize("model,mode", [("Pop", "uni29"), ("Pop", "full"), ("SASRec", "uni29")])
def test_per_user_metrics_average_to_recbole_results(tmp_path, monkeypatch, model, mode):
    from recbole_weaverec.quick_start import build_config, get_trainer_class, prepare

    monkeypatch.chdir(tmp_path)
    data = write_tiny_dataset(tmp_path / "data", n_users=45)
    config = build_config(model, "tiny", config_dict={
        "data_path": str(data), "eval_mode": mode, "metrics": ["NDCG", "Hit", "MRR"], "topk": [1, 5],
        "valid_metric": "NDCG@5", "epochs": 1, "show_progress": False, "train_neg_sample_args": None,
        "checkpoint_dir": str(tmp_path / "saved")})
    _, train, valid, test = prepare(config)
    net = config.model_class(config, train._dataset).to(config["device"])
    trainer = get_trainer_class(config, config.model_class)(config, net)
    trainer.fit(train, valid, saved=False)
    expected = trainer.evaluate(test, load_best_model=False)
    users, values = per_user_metrics(trainer, test)
    assert len(users) == len(set(users.tolist())) == len(values["ndcg@5"]) > 30
    assert set(users.tolist()) == set(test._dataset.inter_feat[config["USER_ID_FIELD"]].numpy().tolist())
    for key in ("ndcg@1", "ndcg@5", "hit@5", "mrr@5"):
        assert values[key].mean() == pytest.approx(expected[key], abs=1e-4), key


def test_pop_counts_every_interaction_whatever_the_batch_size(tmp_path, monkeypatch):
    """RecBole's Pop counted an item once per batch (patches.py); now its counts are the training interactions."""
    import torch

    from recbole_weaverec.quick_start import build_config, get_trainer_class, prepare

    monkeypatch.chdir(tmp_path)
    data = write_tiny_dataset(tmp_path / "data", n_users=30)
    counts = []
    for batch in (1, 4096):
        config = build_config("Pop", "tiny", config_dict={"data_path": str(data), "train_batch_size": batch,
                                                          "epochs": 1, "show_progress": False})
        _, train, valid, _ = prepare(config)
        net = config.model_class(config, train._dataset)
        get_trainer_class(config, config.model_class)(config, net).fit(train, None, saved=False)
        counts.append(net.item_cnt.flatten())
    items = train._dataset.inter_feat[config["ITEM_ID_FIELD"]]
    expected = torch.bincount(items, minlength=train._dataset.item_num)
    assert torch.equal(counts[0], expected) and torch.equal(counts[1], expected) and expected.max() > 1
