"""Candidate scores: the length-normalised log-likelihood of each candidate's answer (title + end-of-turn).

One forward pass over the prompt fills a key/value cache (batch 1). Each chunk of candidates then goes through the
model as ONE packed row appended to that cache: the answers' tokens side by side, position ids restarting after the
prompt for every answer, and a block attention mask under which each answer token sees the whole prompt and the
earlier tokens of its own answer only. So the cache is never copied per candidate (the old path repeated a ~400-token
cache 30 times per user) and each chunk costs one forward over its answer tokens. The chunk's keys and values are
cropped off the cache again before the next chunk. Log-probabilities are taken as logit - logsumexp, gathered only for
the answer tokens, so no second vocabulary-wide tensor is made.

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


def score_candidates(model, prompt_ids, answers, chunk_size=64, pad_id=0, grad=False):
    """Length-normalised log-likelihood (float32 tensor [len(answers)]) of each answer given the prompt.

    ``grad=True`` keeps the autograd graph (e.g. to fit merge coefficients on these scores): all candidates then go
    in one chunk, and the scores stay on the model's device. ``pad_id`` is unused (packed rows have no padding); it
    stays for callers written against the padded path."""
    if grad:
        with torch.enable_grad():
            return _score(model, prompt_ids, answers, max(1, len(answers)), keep_graph=True)
    with torch.inference_mode():
        return _score(model, prompt_ids, answers, chunk_size, keep_graph=False)


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


def _score(model, prompt_ids, answers, chunk_size, keep_graph):
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    n_prompt = prompt.shape[1]
    # only the last prompt position's logits are needed (the vocabulary projection is ~20% of a small LM's work)
    out = _forward(model, DynamicCache(), input_ids=prompt, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # distribution of every answer's first token
    cache = out.past_key_values
    scores = []
    for start in range(0, len(answers), chunk_size):
        chunk = [list(a) for a in answers[start:start + chunk_size]]
        lengths = torch.tensor([len(a) for a in chunk], dtype=torch.float32, device=device)
        logp = first[torch.tensor([a[0] for a in chunk], device=device)]
        if any(len(a) > 1 for a in chunk):
            ids, positions, mask, targets, owner = packed_answers(chunk, n_prompt, device)
            if getattr(_base(model).config, "_attn_implementation", "sdpa") != "sdpa":  # eager and others add the mask to the attention logits
                mask = torch.zeros(mask.shape, dtype=first.dtype, device=device).masked_fill(~mask, -torch.inf)
            logits = _forward(model, cache, input_ids=ids, position_ids=positions, attention_mask=mask).logits[0]
            logits = logits.float()
            token_logp = logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
            logp = logp.index_add(0, owner, token_logp)
            cache.crop(-ids.shape[1])  # the next chunk sees the prompt only (negative: tokens to drop)
        scores.append(logp / lengths)
    out = torch.cat(scores).float()
    return out if keep_graph else out.cpu()
