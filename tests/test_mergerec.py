"""MergeRec: task vectors, TIES, pseudo-users, coefficient-only learning, KD loss, CLI, bad input (tiny models)."""
import gc
import math
import subprocess
import sys
import weakref

import pytest
import torch

from recbole_weaverec.config import ConfigError
from recbole_weaverec.errors import MergeError
from recbole_weaverec.data.itemtext import MissingTextFieldError
from recbole_weaverec.merging import combine_task_vectors, prepare_task_vectors, task_vector
from recbole_weaverec.model.twotower.distill import distill_loss, one_item_history, pseudo_users
from recbole_weaverec.quick_start import build_config, run

from conftest import REPO, SHARED_DATA, needs_shared_data, write_tiny_dataset
from recbole_weaverec.testing import write_slice
from test_twotower import make_tiny_encoder

SMALL = {"epochs": 1, "train_batch_size": 16, "max_user_tokens": 32, "max_item_tokens": 12, "learning_rate": 1e-3,
         "show_progress": False, "state": "WARNING", "merge_steps": 3, "merge_batch_size": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mergerec")
    data = root / "data"
    write_tiny_dataset(data, "ta", seed=0, n_items=25)
    write_tiny_dataset(data, "tb", seed=1, n_items=30)
    encoder = make_tiny_encoder(root / "enc", init_range=0.5)  # distinct item embeddings: the KD loss can move
    return {"root": root, "data": data, "encoder": encoder, "cache": root / "cache"}


@pytest.fixture(autouse=True)
def learn_afresh(world):
    """Each test learns its own merge: coefficients saved by an earlier test of the module are not reused (the
    domain models are: fine-tuning them is what takes time)."""
    for f in world["cache"].glob("coefficients-*.json"):
        f.unlink()


def cfg(world, **kw):
    return {**SMALL, "data_path": str(world["data"]), "text_encoder_path": world["encoder"],
            "merge_domains": ["ta", "tb"], "merge_cache_dir": str(world["cache"]), **kw}


def pipeline(world, **kw):
    from recbole.data import create_dataset

    from recbole_weaverec.model.twotower.mergerec import MergePipeline, MergeRec

    config = build_config("MergeRec", "ta", config_dict=cfg(world, **kw))
    model = MergeRec(config, create_dataset(config).build()[0])
    return MergePipeline(config, model)


def finetuned(pipe):
    """{domain: fine-tuned encoder state}, read from the cache (the pipeline keeps none of them after run)."""
    from recbole_weaverec.model.twotower.domains import domain_models

    return {d: s for d, (s, _) in domain_models(pipe.config, pipe.tconfig, pipe.domains).items()}


def test_task_vectors_round_trip(world, run_dir):
    from recbole_weaverec.model.twotower.mergerec import coefficient_groups
    from recbole_weaverec.model.twotower.stacked import StackedTaskVectors

    pipe = pipeline(world, merge_learn=False)
    pipe.run()
    states = finetuned(pipe)
    base = pipe.model.base_state
    keys = [k for k, v in base.items() if v.is_floating_point()]
    group_of, groups = coefficient_groups(keys)
    stacked = StackedTaskVectors(base, keys, 2, group_of)  # layer-wise layout: keys reordered by group
    with pytest.raises(MergeError, match=r"task vectors \[0, 1\] of 2 were never set"):
        stacked.prepare("task_arithmetic", 0.2)
    for k, d in enumerate(pipe.domains):
        stacked.set_task_vector(k, states[d], base)
    stacked.prepare("task_arithmetic", 0.2)
    for k, d in enumerate(pipe.domains):
        tv = task_vector(states[d], base, keys)
        assert any(v.abs().max() > 0 for v in tv.values())  # fine-tuning moved the weights
        assert all(torch.equal(stacked.row(k)[key], tv[key]) for key in keys)
        onehot = torch.zeros(len(pipe.domains))
        onehot[k] = 1.0
        back = combine_task_vectors(base, prepare_task_vectors([task_vector(states[e], base, keys)
                                                                 for e in pipe.domains]), onehot)
        flat = stacked.state(onehot.unsqueeze(1).repeat(1, len(groups)))
        for key in keys:  # θ_base + τ_k = θ_k, both ways
            assert torch.allclose(back[key], states[d][key], atol=1e-6)
            assert torch.allclose(flat[key], states[d][key], atol=1e-6)


def test_ties_trims_elects_and_takes_disjoint_mean():
    base = {"w": torch.zeros(4)}
    tvs = [{"w": torch.tensor([3.0, -1.0, 0.1, 2.0])},
           {"w": torch.tensor([-2.0, -4.0, 0.2, 1.0])},
           {"w": torch.tensor([1.0, 0.0, -5.0, -0.5])}]
    prepared = prepare_task_vectors(tvs, method="ties", density=0.5)
    # trim to the 2 largest |τ| each: [3,0,0,2], [-2,-4,0,0], [1,0,-5,0]; signs by total mass: +, -, -, +;
    # disjoint mean of the agreeing entries: (3+1)/2, -4, -5, 2
    merged = combine_task_vectors(base, prepared, torch.ones(3))
    assert torch.allclose(merged["w"], torch.tensor([2.0, -4.0, -5.0, 2.0]))


def random_states(seed=0, k=3):
    """A base state with a parameter larger than one float32 block of the bfloat16 product, and k task vectors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb.weight": (400, 300), "layer.0.w": (7, 5), "layer.0.b": (5,), "layer.1.w": (5, 5)}
    base = {key: torch.randn(shape, generator=g) for key, shape in shapes.items()}
    base["ids"] = torch.arange(4)  # not floating point: passes through
    tvs = [{key: torch.randn(shape, generator=g) * 1e-2 for key, shape in shapes.items()} for _ in range(k)]
    return base, list(shapes), tvs


def stacked_of(base, keys, tvs, **kw):
    from recbole_weaverec.model.twotower.stacked import StackedTaskVectors

    stacked = StackedTaskVectors(base, keys, len(tvs), **kw)
    for i, tv in enumerate(tvs):
        stacked.set_task_vector(i, {k: base[k] + tv[k] for k in keys} | {"ids": base["ids"]}, base)
    return stacked


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_stacked_ties_prepared_in_place_equals_prepare_task_vectors(density):
    base, keys, tvs = random_states()
    stacked = stacked_of(base, keys, tvs).prepare("ties", density)
    reference = prepare_task_vectors([{k: stacked_of(base, keys, tvs).row(i)[k] for k in keys}
                                      for i in range(len(tvs))], method="ties", density=density)
    for i in range(len(tvs)):
        assert all(torch.equal(stacked.row(i)[k], reference[i][k]) for k in keys)
    kept = sum(int((stacked.row(0)[k] != 0).sum()) for k in keys)
    assert kept < 0.3 * sum(base[k].numel() for k in keys) if density < 1 else kept > 0
    with pytest.raises(MergeError, match="density must be in"):
        stacked_of(base, keys, tvs).prepare("ties", 0)


def test_bfloat16_task_vectors_merge_and_differentiate_like_float32_on_the_stored_values():
    from recbole_weaverec.model.twotower.stacked import StackedTaskVectors

    base, keys, tvs = random_states(seed=1)
    group_of = {k: (0 if k.startswith("emb") else 1) for k in keys}
    half = stacked_of(base, keys, tvs, group_of=group_of, dtype=torch.bfloat16).prepare("ties", 0.5)
    assert half.vectors.dtype == torch.bfloat16 and half.base.dtype == torch.float32
    assert half.vectors.element_size() * half.vectors.numel() * 2 == (
        stacked_of(base, keys, tvs).vectors.numel() * 4)  # half the bytes
    full = StackedTaskVectors(base, keys, len(tvs), group_of=group_of)  # float32 rows = the stored bf16 values
    full.vectors.copy_(half.vectors.float())
    coefficients = torch.tensor([[0.3, 1.1], [0.7, -0.2], [1.3, 0.5]])
    grads = []
    for stacked in (half, full):
        c = coefficients.clone().requires_grad_()
        merged = stacked.merged(c)
        loss = sum((merged[k] * torch.cos(torch.arange(merged[k].numel()).view_as(merged[k]) * 1.0)).sum()
                   for k in keys)
        loss.backward()
        grads.append(c.grad)
        assert torch.equal(merged["ids"], base["ids"])
        if stacked is half:
            values = {k: merged[k].detach() for k in keys}
    reference = full.state(coefficients)
    for k in keys:
        assert values[k].dtype == torch.float32
        torch.testing.assert_close(values[k], reference[k], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-4)
    assert (grads[0] != 0).all()
    with pytest.raises(MergeError, match="dtype torch.float16 is not allowed: expected one of float32, bfloat16"):
        StackedTaskVectors(base, keys, 2, dtype=torch.float16)


def test_pseudo_users_one_sequence_per_item_per_domain():
    users = pseudo_users([4, 6])  # n_items includes the padding item 0
    assert len(users) == 3 + 5
    pairs = set(zip(users.domain.tolist(), users.item.tolist()))
    assert pairs == {(0, i) for i in range(1, 4)} | {(1, i) for i in range(1, 6)}


def test_held_out_pseudo_users_are_per_domain_disjoint_and_fixed():
    from recbole_weaverec.model.twotower.distill import split_pseudo_users

    users = pseudo_users([11, 41, 3])
    train, held = split_pseudo_users(users, 0.25)
    pairs = lambda u: set(zip(u.domain.tolist(), u.item.tolist()))  # noqa: E731
    assert pairs(train) | pairs(held) == pairs(users) and not pairs(train) & pairs(held)
    assert [int((held.domain == d).sum()) for d in range(3)] == [2, 10, 1]  # 25% of 10, 40, 2 (at least one)
    assert pairs(split_pseudo_users(users, 0.25)[1]) == pairs(held)  # the same items every time
    assert pairs(split_pseudo_users(users, 0.25, seed=1)[1]) != pairs(held)
    assert len(split_pseudo_users(users, 0.0)[1]) == 0 and len(split_pseudo_users(users, 0.0)[0]) == len(users)


def test_held_out_loss_is_logged_and_the_best_coefficients_are_kept(world, run_dir):
    from recbole_weaverec.model.twotower.distill import held_out_objective

    pipe = pipeline(world, merge_steps=6, merge_lr=0.05, merge_valid_ratio=0.3, merge_valid_every=2)
    pipe.run(keep_learner=True)
    learner = pipe.learner
    assert [s for s, _ in pipe.valid_losses] == [0, 2, 4, 6]
    train = set(zip(learner.users.domain.tolist(), learner.users.item.tolist()))
    held = set(zip(learner.held_out.domain.tolist(), learner.held_out.item.tolist()))
    assert held and not train & held  # never trained on
    for _ in range(len(learner.users) // learner.batch_size + 1):
        d, i = learner.next_batch()
        assert not set(zip(d.tolist(), i.tolist())) & held
    best = min(v for _, v in pipe.valid_losses)
    learner.coefficients.data.copy_(pipe.coefficients)  # what the merge kept
    assert learner.valid_loss() == pytest.approx(best, rel=1e-5)
    # at the initial merge the learner's frozen student items are the merge's own: both losses agree
    towers = [pipe.domain(d)[0].tower for d in pipe.domains]
    teachers = [(u, i, inputs) for (u, i), inputs in zip(learner.teachers, learner.user_inputs)]
    init = learner.merged_params(torch.full_like(learner.coefficients, 0.2))
    objective = held_out_objective(towers, teachers, init, learner.held_out, 1000.0, 0.05, 7)
    assert objective == pytest.approx(pipe.valid_losses[0][1], rel=1e-4)
    assert pipe.valid_losses[-1][1] < pipe.valid_losses[0][1]  # on these tiny domains the held-out loss falls
    # a step far too large overshoots: the held-out loss rises, and the merge keeps the initial coefficients
    wild = pipeline(world, merge_steps=6, merge_lr=3.0, merge_valid_ratio=0.3, merge_valid_every=2)
    wild.run(keep_learner=True)
    assert min(wild.valid_losses, key=lambda sv: sv[1])[0] == wild.best_valid_step == 0, wild.valid_losses
    assert torch.equal(wild.coefficients, torch.full_like(wild.coefficients, 0.2))
    assert not torch.allclose(wild.learner.coefficients.detach().cpu(), wild.coefficients)
    with pytest.raises(ConfigError, match="merge_valid_ratio=1.0 is out of range"):
        build_config("MergeRec", "ta", config_dict=cfg(world, merge_valid_ratio=1.0))


def test_learning_uses_pseudo_users_only_and_only_coefficients_get_gradients(world, run_dir):
    pipe = pipeline(world, merge_steps=2, merge_granularity="layer")
    pipe.run(keep_learner=True)
    learner = pipe.learner
    n_items = [pipe.domain(d)[0].n_items for d in pipe.domains]
    assert len(learner.users) == sum(n - 1 for n in n_items)  # one per item per domain, nothing else
    assert set(vars(learner.users)) == {"domain", "item"}  # no user ids, no interactions
    learner.optimizer.zero_grad()
    learner.loss(*learner.next_batch()).backward()
    assert learner.coefficients.grad is not None and learner.coefficients.grad.abs().sum() > 0
    assert learner.coefficients.shape == (2, len(pipe.groups)) and len(pipe.groups) > 2
    modules = [pipe.model] + [pipe.domain(d)[0] for d in pipe.domains]
    assert all(p.grad is None for m in modules for p in m.parameters())
    assert not any(p.requires_grad for p in pipe.model.parameters())
    assert not torch.equal(pipe.coefficients, torch.full_like(pipe.coefficients, 0.2))  # learned: moved


def test_kd_loss_matches_hand_computation():
    student = torch.tensor([[0.2, -0.1, 0.5], [0.0, 0.3, 0.1]])
    teacher = torch.tensor([[0.1, 0.4, 0.3], [0.9, -0.2, 0.0]])
    w, t = 1000.0, 0.05
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        target = max(range(3), key=lambda j: t_row[j])
        ce = -s_row[target] + math.log(sum(math.exp(x) for x in s_row))
        zs = sum(math.exp(x / t) for x in s_row)
        zt = sum(math.exp(x / t) for x in t_row)
        p = [math.exp(x / t) / zt for x in t_row]
        q = [math.exp(x / t) / zs for x in s_row]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        total += ce + w * t * t * kl
    assert distill_loss(student, teacher, w, t).item() == pytest.approx(total / 2, rel=1e-4)


def test_training_free_merges_equal_merging_module(world, run_dir):
    from recbole_weaverec.merging import apply_task_vectors

    pipe = pipeline(world, merge_init="ties", merge_learn=False)
    pipe.run()
    base = pipe.model.base_state
    keys = [k for k, v in base.items() if v.is_floating_point()]
    states = finetuned(pipe)
    expected = apply_task_vectors(base, [task_vector(states[d], base, keys) for d in pipe.domains],
                                  torch.ones(2), method="ties", density=0.2)
    got = pipe.model.tower.encoder.state_dict()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in keys)
    assert torch.equal(pipe.coefficients, torch.ones(2))


def test_per_user_values_of_each_domain_average_to_its_result(world, run_dir):
    """The benchmark's paired intervals read these: one value per test user, from the evaluation's own scores."""
    pipe = pipeline(world, merge_init="average", merge_learn=False)
    pipe.run()
    records = {}
    results = pipe.evaluate_domains(pipe.model.tower.encoder.state_dict(), per_user=records)
    assert set(records) == set(results) == {"ta", "tb"}
    for d, (users, values) in records.items():
        n_test = len(pipe.domain(d)[1]._dataset.inter_feat)
        assert users is not None and len(users) == len(set(users.tolist())) == n_test
        assert set(values) == set(results[d])
        assert all(math.isclose(float(values[m].mean()), results[d][m], abs_tol=1e-4) for m in results[d])


def test_run_reports_every_domain_and_reuses_domain_models(world, run_dir, caplog, monkeypatch):
    import logging

    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec

    rows, predict = [], TextSeqRec.full_sort_predict  # the merged model's and every domain's evaluation
    monkeypatch.setattr(TextSeqRec, "full_sort_predict", lambda m, inter: rows.append(len(inter)) or predict(m, inter))
    caplog.set_level(logging.INFO)
    result = run("MergeRec", "tb", config_dict=cfg(world, state="INFO", encode_batch_size=4))
    assert max(rows) == 4 and sum(rows) >= 3 * 40  # 40 users each: valid (tb), test (tb, ta)...: 4 at a time
    assert 0.0 <= result["test_result"]["ndcg@10"] <= 1.0
    assert set(result["domain_test_results"]) == {"ta", "tb"}  # quick_start passes a model's extra_results through
    assert result["domain_test_results"]["tb"] == result["test_result"]
    avg = result["average_test_result"]["ndcg@10"]
    assert avg == pytest.approx(sum(r["ndcg@10"] for r in result["domain_test_results"].values()) / 2)
    assert all(0.0 <= r["ndcg@10"] <= 1.0 for r in result["domain_test_results"].values())
    text = caplog.text
    assert "merged model on tb" in text and "merged model on ta" in text and "average over 2 domains" in text
    assert text.index("merged model on tb") < text.index("merged model on ta")  # --dataset shown first
    caplog.clear()
    run("MergeRec", "ta", config_dict=cfg(world, state="INFO", merge_learn=False))  # a later run: models reused
    assert "reusing fine-tuned model" in caplog.text and "fine-tuning TextSeqRec" not in caplog.text


def test_learned_coefficients_are_reused_by_a_run_for_another_domain(world, run_dir, caplog, monkeypatch):
    import logging

    from recbole_weaverec.model.twotower.distill import CoefficientLearner
    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec

    caplog.set_level(logging.INFO)
    steps, real_step = [], CoefficientLearner.step
    monkeypatch.setattr(CoefficientLearner, "step", lambda self, *a: steps.append(1) or real_step(self, *a))
    first = pipeline(world)
    first.run()
    assert len(steps) == SMALL["merge_steps"] and len(list(world["cache"].glob("coefficients-*.json"))) == 1
    rows, predict = [], TextSeqRec.full_sort_predict
    monkeypatch.setattr(TextSeqRec, "full_sort_predict", lambda m, inter: rows.append(1) or predict(m, inter))
    # the board's cell for the other domain: the merge is read, not learned; tested on its own domain only
    result = run("MergeRec", "tb", config_dict=cfg(world, state="INFO", merge_eval_domains="dataset"))
    assert len(steps) == SMALL["merge_steps"] and "reusing the coefficients learned before" in caplog.text
    assert "merged model on ta" not in caplog.text and "domain_test_results" not in result
    second = pipeline(world)
    second.run()
    assert torch.equal(second.coefficients, first.coefficients) and len(steps) == SMALL["merge_steps"]
    assert not torch.equal(first.coefficients, torch.full_like(first.coefficients, 0.2))  # learning moved them
    pipeline(world, merge_lr=0.01).run()  # another learning setting: learned, not read
    assert len(steps) == 2 * SMALL["merge_steps"]
    for f in world["cache"].glob("coefficients-*.json"):  # a cut or edited file is learned again, with a warning
        f.write_text('{"coefficients": [1.0, 2.0, 3.0]}')
    caplog.clear()
    again = pipeline(world)
    again.run()
    assert len(steps) == 3 * SMALL["merge_steps"] and "learning them again" in caplog.text
    assert torch.equal(again.coefficients, first.coefficients)  # and learning is deterministic
    with pytest.raises(ConfigError, match="merge_eval_domains='some' is not allowed: expected one of all, dataset"):
        build_config("MergeRec", "ta", config_dict=cfg(world, merge_eval_domains="some"))


def test_one_domain_is_refused(world, run_dir):
    with pytest.raises(ConfigError, match="merge_domains.*1 domain"):
        build_config("MergeRec", "ta", config_dict=cfg(world, merge_domains=["ta"]))
    with pytest.raises(ConfigError, match="merge_layer_groups='layers' is not allowed: expected one of others, "
                                          "modules"):
        build_config("MergeRec", "ta", config_dict=cfg(world, merge_layer_groups="layers"))
    with pytest.raises(ConfigError, match="merge_vector_dtype='float16' is not allowed: expected one of float32, "
                                          "bfloat16"):
        build_config("MergeRec", "ta", config_dict=cfg(world, merge_vector_dtype="float16"))


def test_teachers_top_item_for_a_pseudo_user_is_that_item(world, run_dir):
    pipe = pipeline(world, merge_steps=1)
    pipe.run(keep_learner=True)
    learner = pipe.learner
    for d, name in enumerate(pipe.domains):
        n = pipe.domain(name)[0].n_items
        items = torch.arange(1, n)
        scores = learner.teacher_scores(d, items)  # what the KD loss uses
        assert scores.shape == (n - 1, n - 1)
        assert torch.equal(scores.argmax(dim=1), items - 1)  # column j is item j + 1
        assert torch.allclose(scores.diagonal(), torch.ones(n - 1), atol=1e-5)  # cosine 1 with itself


@pytest.mark.parametrize("vectors", ["float32", "bfloat16"])
def test_distillation_loss_falls_on_a_fixed_batch(world, run_dir, vectors):
    pipe = pipeline(world, merge_steps=1, merge_lr=0.02, merge_batch_size=16, merge_vector_dtype=vectors)
    pipe.run(keep_learner=True)
    learner = pipe.learner
    assert learner.stacked.vectors.dtype == getattr(torch, vectors)
    batch = learner.next_batch()
    start = learner.coefficients.detach().clone()
    losses = [learner.step(batch) for _ in range(12)]
    # CE ≈ log(n items) of it cannot go (cosine logits lie in [-1, 1]); the rest falls, step after step
    assert losses[-1] < losses[0] - 0.02, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses
    assert not torch.allclose(learner.coefficients.detach(), start)


def test_layer_wise_others_group_gets_a_gradient(world, run_dir):
    pipe = pipeline(world, merge_steps=1, merge_granularity="layer")
    pipe.run(keep_learner=True)
    assert pipe.groups == ["others", "encoder.layer.0", "encoder.layer.1"]  # all non-layer parameters in one group
    learner = pipe.learner
    learner.optimizer.zero_grad()
    learner.loss(*learner.next_batch()).backward()
    assert (learner.coefficients.grad.abs() > 0).all()  # every domain × group, "others" included
    pipe = pipeline(world, merge_steps=1, merge_granularity="layer", merge_layer_groups="modules")
    pipe.run(keep_learner=True)
    learner = pipe.learner
    learner.optimizer.zero_grad()
    learner.loss(*learner.next_batch()).backward()
    pooler = pipe.groups.index("pooler.dense")
    assert len(pipe.groups) > 3 and torch.equal(learner.coefficients.grad[:, pooler], torch.zeros(2))  # why: unused


def test_domain_fine_tuning_stops_early_and_keeps_the_best_validation_epoch(world, run_dir, monkeypatch):
    from recbole_weaverec.model.twotower import domains
    from recbole_weaverec.model.twotower.trainer import TextSeqRecTrainer

    scores, states = iter([0.1, 0.3, 0.2, 0.1, 0.9, 0.9]), []

    def scripted(self, valid_data, show_progress=False):  # valid NDCG@10 per epoch, weights recorded
        states.append({k: v.clone() for k, v in self.model.tower.encoder.state_dict().items()})
        score = next(scores)
        return score, {"ndcg@10": score}

    monkeypatch.setattr(TextSeqRecTrainer, "_valid_epoch", scripted)
    config = build_config("MergeRec", "ta", config_dict=cfg(world, epochs=6, stopping_step=1))
    dconfig = domains.text_config(config)
    assert dconfig["valid_metric"].lower() == "ndcg@10"
    model = domains.finetune_domain(dconfig)
    assert len(states) == 4  # best at epoch 1, then 2 evaluations without gain > stopping_step=1: stopped
    got = model.tower.encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in states[1].items())
    assert not all(torch.equal(got[k], v) for k, v in states[3].items())


def test_different_encoders_are_refused_with_both_names(world, run_dir, tmp_path):
    from recbole_weaverec.model.twotower.domains import DomainModelMismatchError, encoder_meta, save_domain_model
    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec
    from recbole_weaverec.model.twotower.domains import text_config
    from recbole.data import create_dataset

    other = make_tiny_encoder(tmp_path / "other", vocab_size=30600)  # another vocabulary size
    config = build_config("MergeRec", "tb", config_dict=cfg(world, text_encoder_path=other))
    tconfig = text_config(config)
    model = TextSeqRec(tconfig, create_dataset(tconfig).build()[0])
    save_domain_model(tmp_path / "tb.safetensors", model.tower.encoder.state_dict(), encoder_meta(model, "tb"))
    pipe = pipeline(world, merge_learn=False, merge_finetuned={"tb": str(tmp_path / "tb.safetensors")})
    with pytest.raises(DomainModelMismatchError) as e:
        pipe.run()
    assert "'ta'" in str(e.value) and "'tb'" in str(e.value) and "vocab_size" in str(e.value)


def test_domain_without_text_fields_is_named(world, run_dir):
    write_tiny_dataset(world["data"], "tnotext", titles=False)
    with pytest.raises(MissingTextFieldError, match="tnotext"):
        pipe = pipeline(world, merge_domains=["ta", "tnotext"], merge_learn=False, text_fields=["title", "categories"])
        pipe.run()


def reference_loss(towers, teachers, student_items, params, domains, items):
    """The previous implementation's loss: one student forward per domain of the batch, on combine_task_vectors."""
    total = 0.0
    for d in domains.unique().tolist():
        sel = domains == d
        it = items[sel]
        user = towers[d].encode(towers[d].user_inputs(*one_item_history(it)), params=params)
        teacher = teachers[d][it - 1] @ teachers[d].T
        total = total + distill_loss(user @ student_items[d].T, teacher, 1000.0, 0.05) * sel.sum() / len(items)
    return total


def test_learned_merge_equals_the_per_domain_reference(world, run_dir):
    """Stacked task vectors, teachers run on their weights and one forward per step give the previous numbers:
    teachers from a separately loaded model per domain, per-parameter merges, per-domain forwards (recomputed)."""
    from recbole_weaverec.model.twotower.domains import domain_text_config
    from recbole_weaverec.model.twotower.mergerec import coefficient_groups
    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec
    from recbole_weaverec.quick_start import prepare

    pipe = pipeline(world, merge_steps=1, merge_granularity="layer")
    pipe.run(keep_learner=True)
    learner = pipe.learner
    base, states = pipe.model.base_state, finetuned(pipe)
    keys = [k for k, v in base.items() if v.is_floating_point()]
    group_of, _ = coefficient_groups(keys)
    prepared = prepare_task_vectors([task_vector(states[d], base, keys) for d in pipe.domains])
    c0 = torch.full_like(learner.coefficients, 0.2)
    init = combine_task_vectors(base, prepared, c0, group_of)
    towers, teachers, student_items = [], [], []
    for k, d in enumerate(pipe.domains):
        dconfig = domain_text_config(pipe.tconfig, d)
        net = TextSeqRec(dconfig, prepare(dconfig)[1]._dataset).eval()  # its own encoder, fine-tuned weights loaded
        net.tower.encoder.load_state_dict(states[d])
        items = torch.arange(1, net.n_items)
        teachers.append(net.tower.encode_all(net.tower.user_inputs(*one_item_history(items)), 128))
        student_items.append(net.tower.encode_all(net.tower.item_inputs(items), 128, params=init))
        towers.append(net.tower)
        assert torch.allclose(learner.teachers[k][0], teachers[k], atol=1e-5)
        assert torch.allclose(learner.student_items[k], student_items[k], atol=1e-5)
    ref = torch.nn.Parameter(c0.clone())
    ref_opt = torch.optim.Adam([ref], lr=learner.optimizer.param_groups[0]["lr"])
    learner.coefficients.data.copy_(c0)
    learner.optimizer = torch.optim.Adam([learner.coefficients], lr=ref_opt.param_groups[0]["lr"])
    mixed = 0
    for _ in range(4):
        batch = learner.next_batch()
        mixed += batch[0].unique().numel() > 1
        ref_opt.zero_grad()
        learner.optimizer.zero_grad()
        old = reference_loss(towers, teachers, student_items, combine_task_vectors(base, prepared, ref, group_of),
                             *batch)
        new = learner.loss(*batch)
        (old + new).backward()  # two separate leaves: each gets its own loss's gradient
        assert new.item() == pytest.approx(old.item(), rel=1e-5)
        assert torch.allclose(learner.coefficients.grad, ref.grad, rtol=1e-3, atol=1e-6)
        ref_opt.step()
        learner.optimizer.step()
    assert mixed  # batches with both domains: the single forward is compared with two
    assert torch.allclose(learner.coefficients, ref, atol=1e-6)
    got, want = learner.stacked.state(learner.coefficients), combine_task_vectors(base, prepared, ref, group_of)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in keys)


def test_one_forward_per_step_teachers_once_and_states_freed(world, run_dir, monkeypatch):
    from recbole_weaverec.model.twotower import mergerec
    from recbole_weaverec.model.twotower.distill import CoefficientLearner
    from recbole_weaverec.model.twotower.stacked import StackedTaskVectors

    refs, alive, matrices, per_step, batches = [], [], [], [], []
    real_iter, real_prepare = mergerec.iter_domain_models, StackedTaskVectors.prepare
    real_step = CoefficientLearner.step

    def tracked(*args, **kwargs):  # is an earlier domain's fine-tuned state still alive when the next one comes?
        for name, (state, meta) in real_iter(*args, **kwargs):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(next(iter(state.values()))))
            yield name, (state, meta)

    def step(self, batch=None):
        batch, before = batch or self.next_batch(), len(calls)
        batches.append(set(batch[0].tolist()))
        out = real_step(self, batch)
        per_step.append(len(calls) - before)
        return out

    monkeypatch.setattr(mergerec, "iter_domain_models", tracked)
    monkeypatch.setattr(StackedTaskVectors, "prepare",
                        lambda self, *a: matrices.append(weakref.ref(self.vectors)) or real_prepare(self, *a))
    monkeypatch.setattr(CoefficientLearner, "step", step)
    pipe = pipeline(world, merge_steps=3, merge_batch_size=8)
    calls = []
    pipe.model.tower.encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe.run()
    assert per_step == [1, 1, 1] and any(len(b) == 2 for b in batches)  # one forward even for a mixed batch
    passes = sum(math.ceil((pipe.domain(d)[0].n_items - 1) / 128) for d in pipe.domains)
    # the teachers once (one-item users = the items' texts: one pass), the student's items once, then the steps
    assert len(calls) == 2 * passes + 3
    assert all(pipe.domain(d)[0].tower.encoder is pipe.model.tower.encoder for d in pipe.domains)  # one encoder
    gc.collect()
    # read twice (task vectors, then the teachers), one fine-tuned state at a time, none kept
    assert alive == [0, 0, 0, 0] and not any(r() for r in refs)
    assert pipe.learner is None and matrices and matrices[0]() is None  # stacked task vectors freed after run


@needs_shared_data()
def test_cli_on_two_real_domain_slices(tmp_path, world):
    data = tmp_path / "data"
    for d in ("amazon-toys", "amazon-pantry"):
        write_slice(SHARED_DATA, d, data, n_users=25)
    args = [sys.executable, str(REPO / "run_recbole_weaverec.py"), "--model=MergeRec", "--dataset=amazon-toys",
            "--merge_domains=[amazon-toys,amazon-pantry]", f"--data_path={data}",
            f"--text_encoder_path={world['encoder']}", f"--merge_cache_dir={tmp_path / 'cache'}", "--merge_steps=2",
            "--epochs=1", "--max_user_tokens=32", "--max_item_tokens=12", "--merge_granularity=layer"]
    out = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    log = out.stdout + out.stderr
    assert "merged model on amazon-toys" in log and "merged model on amazon-pantry" in log
    assert "average over 2 domains" in log
    bad = subprocess.run(args[:4] + ["--merge_domains=[amazon-toys]", f"--data_path={data}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "merge_domains" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
