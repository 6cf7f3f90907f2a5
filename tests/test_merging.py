"""Adapter / task-vector arithmetic (recbole_weaverec/merging.py) on hand-made tensors and a tiny random Llama."""
import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import merge_utils
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from recbole_weaverec import merging as M


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=16, hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=16)
    return LlamaForCausalLM(cfg).eval()


def lora(base, seed, **kw):
    """PeftModel with random (non-zero) A and B on a deep copy of ``base``."""
    torch.manual_seed(seed)
    kw.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    return get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 3, 7, 2, 9], [4, 4, 8, 1, 0, 15]])


def peft_deltas(pm, name="default"):
    """peft's own ΔW for every LoRA layer, keyed by module name without peft's prefix."""
    out = {}
    for mname, module in pm.named_modules():
        if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {}):
            out[mname[len(M.PEFT_PREFIX):]] = module.get_delta_weight(name).detach()
    return out


# ------------------------------------------------------------------------------------------------ lora_deltas
def test_lora_deltas_from_saved_folder_equal_scaled_BA(tmp_path):
    base = tiny_llama()
    pm = lora(base, 1, rank_pattern={"layers.1.self_attn.q_proj": 3}, alpha_pattern={"layers.0.mlp.down_proj": 7})
    pm.save_pretrained(tmp_path / "a")
    deltas = M.lora_deltas(tmp_path / "a", base_model=base)
    assert len(deltas) == 6 and "model.layers.0.self_attn.q_proj" in deltas
    for name, delta in deltas.items():
        layer = pm.base_model.model.get_submodule(name)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        r = a.shape[0]
        alpha = 7 if name == "model.layers.0.mlp.down_proj" else 4
        assert r == (3 if name == "model.layers.1.self_attn.q_proj" else 2)
        assert delta.dtype == torch.float32
        torch.testing.assert_close(delta, (alpha / r) * b.detach() @ a.detach())
    # an in-memory state dict (adapter name in the keys) and a PeftModel give the same deltas
    for source in [(pm.state_dict(), pm.peft_config["default"]), pm]:
        other = M.lora_deltas(source)
        assert set(other) == set(deltas)
        for k in deltas:
            torch.testing.assert_close(other[k], deltas[k])


def test_rslora_scaling_matches_peft():
    pm = lora(tiny_llama(), 2, r=4, lora_alpha=8, use_rslora=True)
    deltas = M.lora_deltas(pm)
    reference = peft_deltas(pm)
    assert set(deltas) == set(reference)
    for k in deltas:
        torch.testing.assert_close(deltas[k], reference[k])
    layer = pm.base_model.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))


def test_dora_and_non_lora_tensors_refused():
    pm = lora(tiny_llama(), 3)
    state = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    with pytest.raises(M.UnsupportedAdapterError, match="DoRA"):
        M.lora_deltas((state, {"r": 2, "lora_alpha": 4, "use_dora": True}))
    state["base_model.model.lm_head.modules_to_save.default.weight"] = torch.zeros(16, 4)
    with pytest.raises(M.UnsupportedAdapterError, match="modules_to_save"):
        M.lora_deltas((state, {"r": 2, "lora_alpha": 4}))


def test_missing_adapter_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        M.lora_deltas(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ merge_deltas
def test_average_merge_equals_mean_of_deltas():
    torch.manual_seed(0)
    ds = [{"a": torch.randn(3, 5), "b.weight": torch.randn(2, 2)} for _ in range(3)]
    merged = M.merge_deltas(ds, method="average")
    for k in ("a", "b.weight"):
        torch.testing.assert_close(merged[k], (ds[0][k] + ds[1][k] + ds[2][k]) / 3)
    w = M.merge_deltas(ds, [0.5, -1.0, 2.0], method="weights")
    torch.testing.assert_close(w["a"], 0.5 * ds[0]["a"] - ds[1]["a"] + 2 * ds[2]["a"])


# density 0.5 keeps 3 of 6 entries per task:
#   t1 -> [3, 0, 0, -4, 6, 0]   t2 -> [-2, 2.5, 0, 0, 4, 0]   t3 -> [1, -3, 0, 2, 0, 0]
# elected signs (sum of trimmed): [+, -, +(0), -, +, +(0)]; disjoint mean over agreeing non-zero entries.
T1 = [3.0, -1.0, 0.5, -4.0, 6.0, 0.1]
T2 = [-2.0, 2.5, 0.1, -1.0, 4.0, 0.2]
T3 = [1.0, -3.0, 0.2, 2.0, 0.3, 0.1]
TIES_EQUAL = [2.0, -3.0, 0.0, -4.0, 5.0, 0.0]       # weights 1, 1, 1
TIES_WEIGHTED = [1.75, -6.0, 0.0, -2.0, 3.5, 0.0]  # weights 0.5, 1, 2: (1.5+2)/2, 2*-3, 0, 0.5*-4, (3+4)/2, 0


def test_ties_hand_example():
    ds = [{"m": torch.tensor(t).view(2, 3)} for t in (T1, T2, T3)]
    out = M.merge_deltas(ds, [1.0, 1.0, 1.0], method="ties", density=0.5)["m"]
    torch.testing.assert_close(out, torch.tensor(TIES_EQUAL).view(2, 3))
    out = M.merge_deltas(ds, [0.5, 1.0, 2.0], method="ties", density=0.5)["m"]
    torch.testing.assert_close(out, torch.tensor(TIES_WEIGHTED).view(2, 3))


def test_other_methods_and_errors():
    torch.manual_seed(0)
    ds = [{"m": torch.randn(4, 4)} for _ in range(2)]
    mp = M.merge_deltas(ds, [1.0, 1.0], method="magnitude_prune", density=0.25)["m"]
    expected = merge_utils.magnitude_prune([d["m"] for d in ds], torch.ones(2), 0.25)
    torch.testing.assert_close(mp, expected)
    a = M.merge_deltas(ds, [1.0, 1.0], method="dare_ties", density=0.5, seed=3)["m"]
    b = M.merge_deltas(ds, [1.0, 1.0], method="dare_ties", density=0.5, seed=3)["m"]
    torch.testing.assert_close(a, b)  # seeded DARE is reproducible
    with pytest.raises(M.MergeError, match="unknown merge method 'mean'.*average.*ties"):
        M.merge_deltas(ds, method="mean")
    with pytest.raises(M.MergeError, match="density"):
        M.merge_deltas(ds, [1.0, 1.0], method="ties", density=0.0)
    with pytest.raises(M.MergeError, match="3 merge weights for 2"):
        M.merge_deltas(ds, [1.0, 1.0, 1.0], method="weights")


def test_different_ranks_merge_at_delta_level():
    base = tiny_llama()
    p2, p4 = lora(base, 4, r=2), lora(base, 5, r=4, lora_alpha=16)
    d2, d4 = M.lora_deltas(p2), M.lora_deltas(p4)
    merged = M.merge_deltas([d2, d4], method="average", names=["r2", "r4"])
    r2, r4 = peft_deltas(p2), peft_deltas(p4)
    for k in merged:
        torch.testing.assert_close(merged[k], (r2[k] + r4[k]) / 2)


def test_lazy_deltas_hold_only_factors_and_equal_the_dense_merge_exactly():
    """What WeaveRec folds: ΔW computed from the LoRA factors when read, equal bit for bit to the dense path."""
    base = tiny_llama()
    p2, p4 = lora(base, 4, r=2, fan_in_fan_out=False), lora(base, 5, r=4, lora_alpha=16)
    dense = [M.lora_deltas(p2), M.lora_deltas(p4)]
    lazy = [M.lora_deltas(p2, base_model=base, lazy=True), M.lora_deltas(p4, lazy=True)]
    assert all(isinstance(d, M.LazyDeltas) and not any(torch.is_tensor(v) for v in vars(d).values()) for d in lazy)
    for d, l in zip(dense, lazy):
        assert list(d) == list(l) and all(torch.equal(d[k], l[k]) and l.shape(k) == tuple(d[k].shape) for k in d)
    for weights, method in ((None, "average"), ([0.3, -1.5], "weights")):
        merged = M.merge_deltas(dense, weights, method)
        combo = M.WeightedDeltas(lazy, weights)
        assert list(combo) == list(merged) and all(torch.equal(combo[k], merged[k]) for k in merged)
    rows = {k: [float(i), 1.0] for i, k in enumerate(dense[0])}  # one row per module (the learned merge)
    combo = M.WeightedDeltas(lazy, rows)
    for i, k in enumerate(dense[0]):
        torch.testing.assert_close(combo[k], i * dense[0][k] + dense[1][k])
    folded = logits(M.fold_deltas(copy.deepcopy(base), M.WeightedDeltas(lazy)), IDS)
    torch.testing.assert_close(folded, logits(M.fold_deltas(copy.deepcopy(base), M.merge_deltas(dense)), IDS),
                               rtol=0, atol=0)
    with pytest.raises(M.MergeError, match="3 merge weights for 2"):
        M.WeightedDeltas(lazy, [1.0, 1.0, 1.0])
    with pytest.raises(M.AdapterMismatchError, match="adapt different modules"):
        M.WeightedDeltas([lazy[0], M.lora_deltas(lora(base, 6, target_modules=["q_proj"]), lazy=True)])


def test_different_target_modules_refused_naming_them():
    base = tiny_llama()
    dq = M.lora_deltas(lora(base, 6, target_modules=["q_proj"]))
    dv = M.lora_deltas(lora(base, 7, target_modules=["q_proj", "v_proj"]))
    with pytest.raises(M.AdapterMismatchError) as err:
        M.merge_deltas([dq, dv], method="average", names=["toys", "beauty"])
    msg = str(err.value)
    assert "'toys'" in msg and "'beauty'" in msg and "model.layers.0.self_attn.v_proj" in msg and "\n" not in msg


def test_other_base_model_refused(tmp_path):
    base = tiny_llama()
    for name, seed in (("a", 8), ("b", 9)):
        lora(base, seed).save_pretrained(tmp_path / name)
    for name, recorded in (("a", "org/base-one"), ("b", "org/base-two")):
        path = tmp_path / name / "adapter_config.json"
        cfg = json.loads(path.read_text())
        cfg["base_model_name_or_path"] = recorded
        path.write_text(json.dumps(cfg))
    assert M.check_same_base([tmp_path / "a"], "org/base-one") == "org/base-one"
    with pytest.raises(M.AdapterMismatchError, match="org/base-two.*org/base-one"):
        M.check_same_base([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(M.AdapterMismatchError, match="org/base-one.*org/other"):
        M.check_same_base([tmp_path / "a"], "org/other")
    # an adapter whose shapes do not fit the given base model is refused too
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(M.AdapterMismatchError, match="shape"):
        M.lora_deltas(tmp_path / "a", base_model=wider)


# ------------------------------------------------------------------------------------------------ folding
def test_fold_single_adapter_equals_merge_and_unload(tmp_path):
    base = tiny_llama()
    pm = lora(base, 10)
    pm.save_pretrained(tmp_path / "a")
    unmerged = logits(pm, IDS)
    merged = logits(copy.deepcopy(pm).merge_and_unload(), IDS)
    folded_model = M.fold_deltas(copy.deepcopy(base), M.lora_deltas(tmp_path / "a"))
    folded = logits(folded_model, IDS)
    assert not torch.allclose(folded, logits(base, IDS))
    torch.testing.assert_close(folded, merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded, unmerged, atol=1e-5, rtol=1e-5)
    # names with peft's prefix work too, and folding into a PeftModel's base layers is the same
    prefixed = {M.PEFT_PREFIX + k: v for k, v in M.lora_deltas(tmp_path / "a").items()}
    torch.testing.assert_close(logits(M.fold_deltas(copy.deepcopy(base), prefixed), IDS), folded)
    other = lora(base, 30)
    M.fold_deltas(other, M.lora_deltas(tmp_path / "a"))
    with other.disable_adapter():
        torch.testing.assert_close(logits(other, IDS), folded, atol=1e-5, rtol=1e-5)
    half = M.fold_deltas(copy.deepcopy(base).to(torch.bfloat16), M.lora_deltas(tmp_path / "a"))
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_fold_merged_equals_unfolded_merged_adapter():
    base = tiny_llama()
    pm = lora(base, 11, r=2)
    torch.manual_seed(12)
    pm.add_adapter("b", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                   init_lora_weights=False))
    da, db = M.lora_deltas(pm, adapter_name="default"), M.lora_deltas(pm, adapter_name="b")
    merged = M.merge_deltas([da, db], [0.3, 0.7], method="weights")
    # peft's exact "cat" combination computes Σ w_i ΔW_i through unmerged LoRA layers
    pm.add_weighted_adapter(["default", "b"], [0.3, 0.7], "mix", combination_type="cat")
    pm.set_adapter("mix")
    unfolded = logits(pm, IDS)
    folded = logits(M.fold_deltas(copy.deepcopy(base), merged), IDS)
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)


def test_fold_unknown_module_refused_and_model_untouched():
    model = nn.Sequential(nn.Linear(2, 2))
    before = model[0].weight.clone()
    with pytest.raises(M.AdapterMismatchError, match="'1'"):
        M.fold_deltas(model, {"0": torch.ones(2, 2), "1": torch.ones(2, 2)})
    torch.testing.assert_close(model[0].weight, before)


# ------------------------------------------------------------------------------------------------ task vectors
def test_task_vectors_round_trip():
    base = tiny_llama(0)
    tuned = [tiny_llama(s) for s in (1, 2)]
    base_state = base.state_dict()
    for ft in tuned:
        tv = M.task_vector(ft.state_dict(), base_state)
        for k, v in ft.state_dict().items():
            torch.testing.assert_close(base_state[k] + tv[k], v)
    # task arithmetic with coefficient 1 on one vector gives that model back
    tvs = [M.task_vector(ft.state_dict(), base_state) for ft in tuned]
    merged = M.apply_task_vectors(base_state, tvs, torch.tensor([1.0, 0.0]))
    for k, v in tuned[0].state_dict().items():
        torch.testing.assert_close(merged[k], v)
    other = nn.Linear(3, 2).state_dict()
    with pytest.raises(M.AdapterMismatchError, match="shape"):
        M.task_vector(other, nn.Linear(4, 2).state_dict())


def test_ties_on_task_vectors_matches_hand_example_and_peft():
    base = {"x.weight": torch.zeros(3), "y.weight": torch.ones(3), "step": torch.tensor(5)}
    tvs = [{"x.weight": torch.tensor(t[:3]), "y.weight": torch.tensor(t[3:])} for t in (T1, T2, T3)]
    # global trimming: the two tensors are trimmed together, as the single 6-vector of the hand example
    merged = M.apply_task_vectors(base, tvs, torch.tensor([1.0, 1.0, 1.0]), method="ties", density=0.5)
    torch.testing.assert_close(merged["x.weight"], torch.tensor(TIES_EQUAL[:3]))
    torch.testing.assert_close(merged["y.weight"], 1 + torch.tensor(TIES_EQUAL[3:]))
    assert merged["step"] is base["step"]
    # per-tensor trimming with coefficients c equals peft's ties(weights=c) on each tensor
    c = torch.tensor([0.5, 1.0, 2.0])
    merged = M.apply_task_vectors(base, tvs, c, method="ties", density=0.5, trim_scope="tensor")
    for k in ("x.weight", "y.weight"):
        torch.testing.assert_close(merged[k] - base[k], merge_utils.ties([tv[k] for tv in tvs], c, 0.5))


def test_layer_groups():
    keys = ["embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "encoder.layer.0.attention.q.weight",
            "encoder.layer.0.output.dense.bias", "encoder.layer.1.attention.q.weight", "encoder.layer.10.x.weight",
            "pooler.dense.weight", "model.layers.3.mlp.up_proj.weight"]
    group_of, names = M.layer_groups(keys)
    assert names == ["embeddings.word_embeddings", "embeddings.LayerNorm", "encoder.layer.0", "encoder.layer.1",
                     "encoder.layer.10", "pooler.dense", "model.layers.3"]
    assert group_of["encoder.layer.0.attention.q.weight"] == group_of["encoder.layer.0.output.dense.bias"] == 2
    assert group_of["encoder.layer.10.x.weight"] == 4


@pytest.mark.parametrize("granularity,method", [("task", "task_arithmetic"), ("layer", "ties")])
def test_apply_task_vectors_gradients_reach_only_coefficients(granularity, method):
    base = tiny_llama(0)
    base_state = {k: v.detach() for k, v in base.state_dict().items()}
    tvs = [M.task_vector(tiny_llama(s).state_dict(), base_state) for s in (1, 2)]
    n_groups = len(M.layer_groups(list(tvs[0]))[1])
    shape = (2,) if granularity == "task" else (2, n_groups)
    coef = torch.full(shape, 0.3, requires_grad=True)
    merged = M.apply_task_vectors(base_state, tvs, coef, method=method, density=0.5, granularity=granularity)
    out = torch.func.functional_call(base, merged, (IDS,))
    out.logits.logsumexp(-1).mean().backward()
    assert coef.grad is not None and coef.grad.shape == shape and coef.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    assert all(not v.requires_grad for tv in tvs for v in tv.values())
    with pytest.raises(M.MergeError, match="granularity 'task'"):
        M.apply_task_vectors(base_state, tvs, torch.ones(2, n_groups), granularity="task")


# ------------------------------------------------------------------------------------------------ learned merge
def test_learned_merge_changes_only_lambda_and_patched_equals_folded():
    base = tiny_llama()
    ds = [M.lora_deltas(lora(base, s, r=r)) for s, r in ((20, 2), (21, 4), (22, 2))]
    merge = M.LearnedDeltaMerge(ds, temperature=0.5)
    assert merge.lam.shape == (len(ds[0]), 3)
    assert [n for n, _ in merge.named_parameters()] == ["lam"]
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    weight_obj = base.model.layers[0].self_attn.q_proj.weight
    buffers_before = [b.clone() for b in merge.buffers()]

    # at init (equal λ) the patched model is the average merge folded in
    average = logits(M.fold_deltas(copy.deepcopy(base), M.merge_deltas(ds, method="average")), IDS)
    with M.patched(base, merge):
        torch.testing.assert_close(logits(base, IDS), average, atol=1e-5, rtol=1e-5)

    lam_before = merge.lam.detach().clone()
    opt = torch.optim.Adam(merge.parameters(), lr=0.1)
    with M.patched(base, merge):
        probs = base(input_ids=IDS).logits.softmax(-1)
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        entropy.backward()
    assert all(p.grad is None for p in base.parameters())
    opt.step()
    assert not torch.equal(merge.lam.detach(), lam_before)
    for k, v in base.state_dict().items():
        assert torch.equal(v, base_before[k]), k
    assert base.model.layers[0].self_attn.q_proj.weight is weight_obj
    assert all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(a, b) for a, b in zip(merge.buffers(), buffers_before))

    with torch.no_grad(), M.patched(base, merge):
        patched_out = logits(base, IDS)
    folded = logits(M.fold_deltas(copy.deepcopy(base), merge.merged()), IDS)
    torch.testing.assert_close(patched_out, folded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patched_out, average, atol=1e-6)


def test_learned_merge_raw_coefficients_on_task_vectors():
    # MergeRec-style use: raw task-wise coefficients on (prepared) task vectors of a plain module
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    tvs = [{k: torch.randn_like(v) for k, v in base_state.items()} for _ in range(2)]
    merge = M.LearnedDeltaMerge(tvs, init=0.2, normalize="none", groups="shared")
    x = torch.randn(4, 3)
    with M.patched(model, merge):
        out = model(x)
    expected = torch.func.functional_call(model, M.apply_task_vectors(base_state, tvs, torch.tensor([0.2, 0.2])), (x,))
    torch.testing.assert_close(out, expected)
