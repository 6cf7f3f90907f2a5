"""``llm_eval: generate``: the reference's evaluation (WeaveRec's public code) inside RecBole's evaluator.

The reference generates an answer greedily (vLLM, temperature 0), splits it on '||' and scores a user by the first
position j of the exact ground-truth title in that list: NDCG@k = 1/log2(j+2) for j < k, MRR = 1/(j+1), else 0.
Here each user's evaluation prompt (the one the likelihood path builds) is answered greedily, the answer is split
into parts, and each candidate whose title, *as the prompt renders it* (``PromptBuilder.truncate``), equals a part
gets the score -j of its first part j; every other candidate gets -inf. No label is read.

RecBole ranks candidates, not generated parts, so ``as_generated_ranking`` (called by ``LLMTrainer`` on RecBole's
[users, items] score matrix) makes its ranks the generated positions: every position p < max(topk) that no candidate
took (a part that matches no candidate, a repeated title, a list shorter than max(topk)) is given to a non-candidate
item with score -p, and the other non-candidate items get NON_CANDIDATE. A matched truth at j then has exactly j
items above it (rank j, as in the reference) and an unmatched truth (-inf) ranks below max(topk) finite items, so it
counts 0 at every k. Exact unless two candidates render to the same title: the reference then credits the truth
for the shared title, while here the two tie (torch.topk orders ties arbitrarily).
"""
import torch

NON_CANDIDATE = -1e30  # finite, so every non-candidate item ranks above an unmatched candidate (-inf)


def default_max_new_tokens(max_title_tokens):
    """Enough for 5 titles (the reference's "top 5" answer): each title plus ~4 tokens of ' || ' and slack."""
    return 5 * (int(max_title_tokens) + 4)


def stop_ids(tokenizer, end_of_turn):
    """Token ids that end an answer: eos, and the chat template's end-of-turn marker when it is one token (what
    training answers end with), so no next turn is generated after the answer."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    return list(dict.fromkeys(ids + (marker if len(marker) == 1 else [])))


@torch.inference_mode()
def generate_text(model, tokenizer, prompt_ids, max_new_tokens, stop):
    """The greedy answer to ``prompt_ids`` (new tokens only, special tokens skipped)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    # a fresh config: plain greedy decoding, not the checkpoint's sampling defaults (temperature, top_p, penalties)
    config = GenerationConfig(do_sample=False, max_new_tokens=int(max_new_tokens), eos_token_id=list(stop) or None,
                              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                              else tokenizer.eos_token_id)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def split_answer(text):
    """The generated list: parts split on '||' (as the reference), each part also split on newlines.

    Positions are kept as generated (the reference counts them so): a part that matches no candidate still takes
    its place. Only the empty lines a newline split makes are dropped (they are layout, not list items); an empty
    part between two '||' stays, as in the reference, so text without newlines splits exactly as there."""
    parts = []
    for piece in text.split("||"):
        lines = [line.strip() for line in piece.split("\n")]
        parts += [line for line in lines if line] or [""]
    return parts


def match_scores(parts, titles):
    """Score of each rendered candidate title: -j for the first part j equal to it (exact string equality after
    strip), -inf when no part is. -j rather than e.g. len(parts) - j: ``as_generated_ranking`` reads j back."""
    first = {}
    for j, part in enumerate(parts):
        first.setdefault(part, j)  # first occurrence wins
    return torch.tensor([float(-first[t.strip()]) if t.strip() in first else -torch.inf for t in titles],
                        dtype=torch.float32)


def generate_scores(model, tokenizer, prompt_ids, titles, max_new_tokens, stop):
    """``match_scores`` of the greedy answer to one user's prompt (``titles``: the candidates as rendered)."""
    return match_scores(split_answer(generate_text(model, tokenizer, prompt_ids, max_new_tokens, stop)), titles)


def as_generated_ranking(scores, listed, k):
    """RecBole's [users, items] matrix (candidates scattered into -inf) with generated positions as ranks: see the
    module docstring. ``listed``: bool mask of each row's candidates; ``k``: max(topk)."""
    out = scores.masked_fill(~listed, NON_CANDIDATE)
    for u in range(out.shape[0]):
        row = scores[u][listed[u]]
        taken = set((-row[torch.isfinite(row)]).round().long().tolist())
        gaps = [p for p in range(k) if p not in taken]
        free = torch.nonzero(~listed[u]).flatten()  # column 0 (padding, never a truth) first
        if len(free) < len(gaps):  # refused before training (LLMRecommender._check_generate); a safety net
            raise RuntimeError(f"llm_eval=generate: {len(free)} non-candidate items for {len(gaps)} positions")
        out[u, free[:len(gaps)]] = -torch.tensor(gaps, dtype=out.dtype, device=out.device)
    return out
