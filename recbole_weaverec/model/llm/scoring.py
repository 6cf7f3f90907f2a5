"""Candidate scores: the length-normalised log-likelihood of each candidate's answer (title + end-of-turn).

One forward pass over the prompt fills a key/value cache; the cache is repeated once per candidate
(``DynamicCache.batch_repeat_interleave``) and one batched pass over all candidate answers (right-padded, position
ids continuing after the prompt) gives every answer token's log-probability. Right padding needs no attention mask:
under the causal mask a real token never sees the pads that follow it. The second pass appends to the cache, so every
call (every user) builds a fresh one; chunks of candidates each get their own copy.
"""
import copy

import torch
from transformers import DynamicCache


def _answer_batch(answers, pad_id, device):
    lengths = torch.tensor([len(a) for a in answers], device=device)
    width = int(lengths.max())
    ids = torch.full((len(answers), width), pad_id, dtype=torch.long, device=device)
    for i, a in enumerate(answers):
        ids[i, :len(a)] = torch.tensor(a, dtype=torch.long)
    return ids, lengths


def score_candidates(model, prompt_ids, answers, chunk_size=64, pad_id=0, grad=False):
    """Length-normalised log-likelihood (float32 tensor [len(answers)]) of each answer given the prompt.

    ``grad=True`` keeps the autograd graph (e.g. to fit merge coefficients on these scores): all candidates then go
    in one chunk, and the scores stay on the model's device."""
    if grad:
        with torch.enable_grad():
            return _score(model, prompt_ids, answers, max(1, len(answers)), pad_id, keep_graph=True)
    with torch.inference_mode():
        return _score(model, prompt_ids, answers, chunk_size, pad_id, keep_graph=False)


def _score(model, prompt_ids, answers, chunk_size, pad_id, keep_graph):
    device = next(model.parameters()).device
    prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    # only the last prompt position's logits are needed (the vocabulary projection is ~20% of a small LM's work)
    out = model(input_ids=prompt, past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # distribution of every answer's first token
    prompt_cache, n_prompt = out.past_key_values, prompt.shape[1]
    scores = []
    for start in range(0, len(answers), chunk_size):
        chunk = answers[start:start + chunk_size]
        ids, lengths = _answer_batch(chunk, pad_id, device)
        logp = first[ids[:, 0]]
        if ids.shape[1] > 1:
            cache = copy.deepcopy(prompt_cache) if start + chunk_size < len(answers) else prompt_cache
            cache.batch_repeat_interleave(len(chunk))
            inputs = ids[:, :-1]  # the last answer token is only ever predicted
            positions = torch.arange(n_prompt, n_prompt + inputs.shape[1], device=device).expand_as(inputs)
            logits = model(input_ids=inputs, past_key_values=cache, position_ids=positions, use_cache=True).logits
            token_logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            mask = torch.arange(1, ids.shape[1], device=device)[None, :] < lengths[:, None]
            logp = logp + (token_logp * mask).sum(1)
        scores.append(logp / lengths)
    out = torch.cat(scores).float()
    return out if keep_graph else out.cpu()


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
