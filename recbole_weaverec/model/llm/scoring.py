"""Candidate scores: the length-normalised log-likelihood of each candidate's answer (title + end-of-turn), or with
``normalize=False`` (``llm_score: sum``) its log-probability, the sum over its tokens.

One forward pass over the prompt fills a key/value cache (batch 1). Each chunk of candidates then goes through the
model as ONE packed row appended to that cache: the answers' tokens side by side, position ids restarting after the
prompt for every answer, and a block attention mask under which each answer token sees the whole prompt and the
earlier tokens of its own answer only. So the cache is never copied per candidate (the old path repeated a ~400-token
cache 30 times per user) and each chunk costs one forward over its answer tokens. The chunk's keys and values are
cropped off the cache again before the next chunk. Log-probabilities are taken as logit - logsumexp, gathered only for
the answer tokens, so no second vocabulary-wide tensor is made.

``score_users`` does the same for several users per forward (``score_users_per_batch``): prompts left-padded to
one length (each row's real prompt then ends in the last column, so ``logits_to_keep=1`` still gives every user's
first-token distribution), each user's packed answers right-padded, position ids per user, and masks under which no
real token sees a padding column; padding queries attend to themselves only (an all-masked row would be NaN).

This ranks all candidates by likelihood; the reference (WeaveRec's public code) instead generates one answer greedily
and exact-matches it against the candidate titles (see ``prompts.py``), so its numbers are not directly comparable.
"""
import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


@lru_cache(maxsize=None)
def _cache_kwarg(model_class):
    """transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` is deprecated there)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's transformer


def _forward(model, cache, **kwargs):
    return model(**{_cache_kwarg(type(_base(model))): cache}, use_cache=True, **kwargs)


def score_candidates(model, prompt_ids, answers, chunk_size=64, pad_id=0, grad=False, normalize=True):
    """Length-normalised log-likelihood (float32 tensor [len(answers)]) of each answer given the prompt; with
    ``normalize=False`` the answer's log-probability (sum over its tokens).

    ``grad=True`` keeps the autograd graph (e.g. to fit merge coefficients on these scores): all candidates then go
    in one chunk, and the scores stay on the model's device. ``pad_id`` is unused (packed rows have no padding); it
    stays for callers written against the padded path."""
    if grad:
        with torch.enable_grad():
            return _score(model, prompt_ids, answers, max(1, len(answers)), keep_graph=True, normalize=normalize)
    with torch.inference_mode():
        return _score(model, prompt_ids, answers, chunk_size, keep_graph=False, normalize=normalize)


def packed_answers(answers, n_prompt, device):
    """(input ids, position ids, block mask [1, 1, T, n_prompt + T], target ids, answer index of each target) of
    one packed row holding every answer's inputs (all its tokens but the last, which is only ever predicted)."""
    inputs, targets, owner, offsets = [], [], [], []
    for i, a in enumerate(answers):
        inputs += a[:-1]
        targets += a[1:]
        owner += [i] * (len(a) - 1)
        offsets += range(len(a) - 1)
    ids = torch.tensor([inputs], dtype=torch.long, device=device)
    owner = torch.tensor(owner, dtype=torch.long, device=device)
    offsets = torch.tensor(offsets, dtype=torch.long, device=device)
    same = owner[:, None] == owner[None, :]
    causal = offsets[None, :] <= offsets[:, None]
    mask = torch.cat([torch.ones(len(inputs), n_prompt, dtype=torch.bool, device=device), same & causal], dim=1)
    positions = (n_prompt + offsets)[None, :]
    return ids, positions, mask[None, None], torch.tensor(targets, dtype=torch.long, device=device), owner


def _attention_mask(model, mask):
    """``mask`` (bool, True = attend) as the attention implementation wants it: sdpa takes it as is, eager and
    others add it to the attention logits."""
    if getattr(_base(model).config, "_attn_implementation", "sdpa") == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, -torch.inf)


def _score(model, prompt_ids, answers, chunk_size, keep_graph, normalize=True):
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    n_prompt = prompt.shape[1]
    # only the last prompt position's logits are needed (the vocabulary projection is ~20% of a small LM's work)
    cache = DynamicCache()  # filled in place (reading it back as out.past_key_values is deprecated)
    out = _forward(model, cache, input_ids=prompt, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # distribution of every answer's first token
    scores = []
    for start in range(0, len(answers), chunk_size):
        chunk = [list(a) for a in answers[start:start + chunk_size]]
        lengths = torch.tensor([len(a) for a in chunk], dtype=torch.float32, device=device)
        logp = first[torch.tensor([a[0] for a in chunk], device=device)]
        if any(len(a) > 1 for a in chunk):
            ids, positions, mask, targets, owner = packed_answers(chunk, n_prompt, device)
            logits = _forward(model, cache, input_ids=ids, position_ids=positions,
                              attention_mask=_attention_mask(model, mask)).logits[0]
            logits = logits.float()
            token_logp = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            logp = logp.index_add(0, owner, token_logp)
            cache.crop(-ids.shape[1])  # the next chunk sees the prompt only (negative: tokens to drop)
        scores.append(logp / lengths if normalize else logp)
    out = torch.cat(scores).float()
    return out if keep_graph else out.cpu()


def score_users(model, users, chunk_size=64, pad_id=0, normalize=True):
    """``score_candidates`` of several users (a list of (prompt ids, answers)) from batched forwards: one over the B
    left-padded prompts, then one per chunk of ``chunk_size`` candidates of every user. Returns a float32 CPU tensor
    per user; the same numbers as one user at a time up to float rounding (kernels see other shapes)."""
    users = [(list(p), [list(a) for a in answers]) for p, answers in users]
    if not users:
        return []
    with torch.inference_mode():
        return _score_batch(model, users, chunk_size, pad_id, normalize)


def _score_batch(model, users, chunk_size, pad_id, normalize=True):
    device = next(model.parameters()).device
    n_prompt = [len(p) for p, _ in users]
    width = max(n_prompt)
    start = torch.tensor([width - n for n in n_prompt], device=device)  # first real column of each row
    ids = torch.full((len(users), width), pad_id, dtype=torch.long, device=device)
    for u, (p, _) in enumerate(users):
        ids[u, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    col = torch.arange(width, device=device)
    real = col[None, :] >= start[:, None]
    positions = (col[None, :] - start[:, None]).clamp(min=0)  # every real prompt starts at position 0
    own = torch.eye(width, dtype=torch.bool, device=device)
    mask = ((col[None, :] <= col[:, None])[None] & real[:, None, :]) | own[None]  # [B, query, key]
    cache = DynamicCache()
    out = _forward(model, cache, input_ids=ids, position_ids=positions,
                   attention_mask=_attention_mask(model, mask[:, None]), logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, vocab]
    scores = [[] for _ in users]
    n_chunks = max(-(-len(answers) // chunk_size) for _, answers in users)
    for k in range(n_chunks):
        chunks = [answers[k * chunk_size:(k + 1) * chunk_size] for _, answers in users]
        packed = [packed_answers(c, n, device) for c, n in zip(chunks, n_prompt)]
        logp = [first[u][torch.tensor([a[0] for a in c], dtype=torch.long, device=device)]
                for u, c in enumerate(chunks)]
        length = max(p[0].shape[1] for p in packed)
        if length:
            ids, positions, mask = _batched_answers(packed, start, width, length, pad_id, device)
            logits = _forward(model, cache, input_ids=ids, position_ids=positions,
                              attention_mask=_attention_mask(model, mask)).logits
            for u, (row_ids, _, _, targets, owner) in enumerate(packed):
                t = row_ids.shape[1]
                if t:  # fp32 log-softmax of one user's answer tokens at a time, not of the whole batch
                    row = logits[u, :t].float()
                    token_logp = row.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(row, dim=-1)
                    logp[u] = logp[u].index_add(0, owner, token_logp)
            del logits
            cache.crop(-length)  # the next chunk sees the prompts only (negative: tokens to drop)
        for u, c in enumerate(chunks):
            if c:
                scores[u].append(logp[u] / torch.tensor([len(a) for a in c], dtype=torch.float32, device=device)
                                 if normalize else logp[u])
    return [torch.cat(s).float().cpu() if s else torch.zeros(0) for s in scores]


def _batched_answers(packed, start, width, length, pad_id, device):
    """(ids [B, length], position ids, mask [B, 1, length, width + length]) of the users' packed answer rows,
    right-padded: row u's answer tokens see its real prompt columns (start[u]:width) and its own answer block;
    padding tokens see only themselves."""
    b = len(packed)
    ids = torch.full((b, length), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((b, length), dtype=torch.long, device=device)
    mask = torch.zeros((b, length, width + length), dtype=torch.bool, device=device)
    pad = torch.arange(length, device=device)
    for u, (row_ids, row_positions, row_mask, _, _) in enumerate(packed):
        t, s = row_ids.shape[1], int(start[u])
        ids[u, :t], positions[u, :t] = row_ids[0], row_positions[0]
        n = width - s
        mask[u, :t, s:width] = row_mask[0, 0, :, :n]
        mask[u, :t, width:width + t] = row_mask[0, 0, :, n:]
        mask[u, pad[t:], width + pad[t:]] = True
    return ids, positions, mask[:, None]
