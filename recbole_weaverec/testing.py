"""Helpers for tests, benchmarks and users' own experiments, kept out of the model code: a tiny randomly
initialised causal LM (no download), the one-forward-per-candidate reference for LLM scores, and slices of real
RecBole atomic files."""
from pathlib import Path

import torch

from recbole_weaverec.model.llm.backbone import set_base_name


def tiny_llama(tokenizer, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
               seed=0, name="tiny-random-llama"):
    """A tiny randomly initialised LlamaForCausalLM with ``tokenizer``'s vocabulary (for tests and examples)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    set_base_name(model, name)
    return model.eval()


@torch.inference_mode()
def naive_scores(model, prompt_ids, answers):
    """The same scores from one full forward pass per candidate (the reference point for tests and benchmarks)."""
    device = next(model.parameters()).device
    out = []
    for answer in answers:
        ids = torch.tensor([list(prompt_ids) + list(answer)], dtype=torch.long, device=device)
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        n = len(prompt_ids)
        tok = logp[n - 1:n - 1 + len(answer)].gather(-1, ids[0, n:, None])[:, 0]
        out.append(tok.sum() / len(answer))
    return torch.stack(out).cpu()


def write_slice(src_root, domain, out_root, n_users=300, seed=0, name=None):
    """A small slice of a real domain (whole sequences of ``n_users`` random users) as RecBole atomic files."""
    import random

    name = name or domain
    src = Path(src_root) / domain
    out = Path(out_root) / name
    out.mkdir(parents=True, exist_ok=True)
    with open(src / f"{domain}.inter", encoding="utf-8") as f:
        header, *rows = f.read().splitlines()
    users = sorted({r.split("\t", 1)[0] for r in rows})
    keep = set(random.Random(seed).sample(users, min(n_users, len(users))))
    rows = [r for r in rows if r.split("\t", 1)[0] in keep]
    items = {r.split("\t")[1] for r in rows}
    (out / f"{name}.inter").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    with open(src / f"{domain}.item", encoding="utf-8") as f:
        iheader, *irows = f.read().splitlines()
    irows = [r for r in irows if r.split("\t", 1)[0] in items]
    (out / f"{name}.item").write_text("\n".join([iheader, *irows]) + "\n", encoding="utf-8")
    return out_root
