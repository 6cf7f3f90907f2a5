"""Merging that fits (issue 16): merged ΔW computed and folded one adapted weight at a time, the learned merge in
factor form. Peak memory above the model must not grow with depth, and the merged weights equal the old path's."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from recbole_weaverec import merging as M
from recbole_weaverec.merging.streaming import FactorMerge, MergedDeltas, fold_merged

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
HIDDEN, INTER, VOCAB = 128, 256, 96


def tiny(layers, seed=0):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def adapters(model, ranks=(4, 8, 4), embedding=False, seed=1):
    """K LoRA adapters over every linear layer of ``model`` (random A and B), as lazy deltas (factors only)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, r in enumerate(ranks):
        state = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(LINEARS):
                key = f"base_model.model.{name}"
                state[f"{key}.lora_A.weight"] = torch.randn(r, module.in_features, generator=gen) * 0.1
                state[f"{key}.lora_B.weight"] = torch.randn(module.out_features, r, generator=gen) * 0.1
        if embedding:
            state["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(r, VOCAB, generator=gen)
            state["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(HIDDEN, r, generator=gen)
        config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r + i}
        out.append(M.lora_deltas((state, config), base_model=model, lazy=True))
    return out


def peak_bytes(fn):
    """Peak of torch's CPU allocations inside ``fn()`` above what was allocated at its start: every allocator
    event is recorded by the profiler (tracemalloc does not see torch's storage)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    now = peak = 0
    for _, change in events:
        now += change
        peak = max(peak, now)
    return peak


def old_fixed(model, deltas):
    M.fold_deltas(model, M.merge_deltas(deltas, method="average"))


def new_fixed(model, deltas):
    fold_merged(model, MergedDeltas(deltas, method="average"))


def old_learned(model, deltas):
    merge = M.LearnedDeltaMerge(deltas)
    M.fold_deltas(model, M.WeightedDeltas(deltas, merge.key_weights()))


def new_learned(model, deltas):
    merge = FactorMerge(deltas)
    fold_merged(model, MergedDeltas(deltas, merge.key_weights(), "weights"))


def peaks(path, depths=(2, 4, 8)):
    out = {}
    for depth in depths:
        model = tiny(depth)
        deltas = adapters(model)  # the adapters' factors are loaded before the measured merge, like the model
        path(model, deltas)  # warm-up (lazy imports, allocator caches)
        out[depth] = peak_bytes(lambda: path(model, deltas))
    return out


def test_peak_memory_of_merge_and_fold_does_not_grow_with_depth():
    layer = INTER * HIDDEN * 4  # the largest adapted weight's ΔW in fp32
    per_layer = 4 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 2 + 3 * HIDDEN * INTER)  # one block's ΔW, fp32
    results = {name: peaks(path) for name, path in
               [("old fixed", old_fixed), ("new fixed", new_fixed), ("old learned", old_learned),
                ("new learned", new_learned)]}
    print({k: {d: round(v / 2 ** 20, 3) for d, v in r.items()} for k, r in results.items()})  # MiB, for the record
    for name in ("new fixed", "new learned"):
        r = results[name]
        assert max(r.values()) <= 1.1 * min(r.values()) + 16384, (name, r)
        assert r[8] <= 12 * layer, (name, r)  # K ΔW + peft's stack + the sum, of one layer
    # the measurement can fail: the old path's peak grows with the model's depth
    for name in ("old fixed", "old learned"):
        r = results[name]
        assert r[8] - r[2] > 0.9 * 6 * per_layer, (name, r)  # every block's merged ΔW at once
        assert r[8] > 3 * results["new" + name[3:]][8], (name, r)


@pytest.mark.parametrize("method,weights", [("average", None), ("weights", [0.5, -1.0, 2.0]),
                                            ("task_arithmetic", [0.3, 0.3, 0.3]), ("ties", [1.0, 1.0, 1.0]),
                                            ("dare_ties", [1.0, 1.0, 1.0]), ("magnitude_prune", [1.0, 0.5, 1.0])])
def test_streamed_fold_equals_the_old_merge_and_fold(method, weights):
    model = tiny(2)
    deltas = adapters(model, embedding=True)
    old, new = copy.deepcopy(model), copy.deepcopy(model)
    M.fold_deltas(old, M.merge_deltas(deltas, weights, method, density=0.5, seed=7))
    fold_merged(new, MergedDeltas(deltas, weights, method, density=0.5, seed=7))
    moved = 0
    for (name, a), (_, b), (_, w0) in zip(old.named_parameters(), new.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
        moved += not torch.equal(a, w0)
    assert moved == 2 * len(LINEARS) + 1  # every adapted weight, the embedding included
    # a bad key leaves the model untouched
    with pytest.raises(M.AdapterMismatchError):
        fold_merged(new, {"model.layers.0.nowhere": torch.zeros(1)})


def test_factor_merge_equals_the_stacked_learned_merge_in_loss_gradient_and_folded_weights():
    model = tiny(2)
    deltas = adapters(model, embedding=True)  # the embedding takes the dense fallback, the linears the hooks
    ids = torch.tensor([[1, 5, 9, 2, 33, 7, 64, 3]])
    stacked, factors = M.LearnedDeltaMerge(deltas, init=1.0), FactorMerge(deltas, init=1.0)
    lam = torch.randn(stacked.lam.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stacked.lam.copy_(lam)
        factors.lam.copy_(lam)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = model(input_ids=ids).logits

    def loss(merge, context):
        with context(model):
            logits = model(input_ids=ids).logits.float()
        p = torch.log_softmax(logits, -1)
        value = -(p.exp() * p).sum(-1).mean()
        value.backward()
        return value.detach(), logits.detach(), merge.lam.grad.clone()

    old = loss(stacked, lambda m: M.patched(m, stacked))
    new = loss(factors, factors.applied)
    torch.testing.assert_close(new[1], old[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(new[0], old[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(new[2], old[2], atol=1e-6, rtol=1e-4)
    assert new[2].abs().sum() > 0 and not torch.allclose(new[1], plain, atol=1e-3)
    # nothing but λ trained; on exit the hooks are gone and the model computes as before
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(input_ids=ids).logits, plain, atol=0, rtol=0)
    # the fitted rows folded one weight at a time equal the old lazy weighted fold
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    M.fold_deltas(a, M.WeightedDeltas(deltas, stacked.key_weights()))
    fold_merged(b, MergedDeltas(deltas, factors.key_weights(), "weights"))
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=0, msg=name)
    with pytest.raises(M.MergeError, match="needs LoRA factors"):
        FactorMerge([dict(d.items()) for d in deltas])
