"""A run's config -> the inputs of the formulas (``formulas.Training``, ``Merge``, ``LearnedFit``, ``Scoring``) -> the
phases it runs.

Token counts are upper bounds from the config alone (no tokenizer, no data): every title at ``max_title_tokens``
tokens plus 2 for its " || " separator, plus the prompt's fixed text (system turn, instructions, chat template: 64
tokens without a candidate list, 80 with one; SmolLM2's template takes 61 and 76), capped at ``max_prompt_tokens``.
An answer is a title + the end-of-turn token. With SmolLM2's tokenizer and 50 history titles + 30 candidates of 64
tokens this gives 5,360 tokens for a real 5,269.
"""
import math
import re

from recbole_weaverec.errors import ConfigError
from recbole_weaverec.plan import formulas as F

OVERHEAD_TOKENS = {False: 64, True: 80}  # prompt text around the titles, without / with a candidate list
SEPARATOR_TOKENS = 2
END_OF_TURN_TOKENS = 1


def weight_bytes(llm_dtype, cuda):
    """Bytes per weight as ``load_backbone`` loads them: auto is bfloat16 on CUDA, float32 on the CPU."""
    if llm_dtype == "auto" or llm_dtype is None:
        return 2 if cuda else 4
    return {"float32": 4, "bfloat16": 2}[llm_dtype]


def lora_targets(value):
    """The Llama-layout linear layers that ``lora_target_modules`` adapts (peft matches module names by suffix)."""
    if value == "all-linear":
        return F.LINEARS
    names = [value] if isinstance(value, str) else list(value)
    targets = tuple(n for n in F.LINEARS if any(n == t or n.endswith("." + t) or t.endswith("." + n) for t in names))
    if not targets:
        raise ConfigError(f"lora_target_modules={value!r} names no linear layer the planner knows: expected "
                          f"all-linear or some of {', '.join(F.LINEARS)}")
    return targets


def prompt_tokens(config, candidates):
    """Upper bound of a prompt's tokens with ``candidates`` titles listed (0: no list)."""
    title = int(config["max_title_tokens"]) + SEPARATOR_TOKENS
    n = OVERHEAD_TOKENS[candidates > 0] + (int(config["max_history"]) + candidates) * title
    cap = config["max_prompt_tokens"]
    return min(n, int(cap)) if cap else n


def eval_candidates(config):
    """(candidates scored per user, listed in the prompt?) of the test protocol: uniN / popN -> N + 1; full -> every
    item (the chunk is then ``score_chunk_size`` titles and the prompt lists none)."""
    modes = config["eval_args"]["mode"]
    mode = str(modes.get("test", next(iter(modes.values()))) if isinstance(modes, dict) else modes)
    if mode == "full":
        return None, False
    sampled = re.fullmatch(r"(?:uni|pop)(\d+)", mode)
    if sampled is None:
        raise ConfigError(f"eval mode {mode!r} is not planned: expected full, uniN or popN")
    return int(sampled.group(1)) + 1, bool(config["prompt_candidates"])


def model_kind(config):
    from recbole_weaverec.model.llm.base import LLMRecommender
    from recbole_weaverec.model.llm.llmmerge import LLMMerge
    from recbole_weaverec.model.llm.weaverec import WeaveRec
    from recbole_weaverec.registry import get_model_class

    cls = get_model_class(config["model"])
    if not (isinstance(cls, type) and issubclass(cls, LLMRecommender)):
        raise ConfigError(f"model {config['model']!r} is not planned: the planner sizes the LLM recommenders "
                          f"(LLMRec, LLMJoint, LLMMerge, WeaveRec)")
    return "weaverec" if issubclass(cls, WeaveRec) else "merge" if issubclass(cls, LLMMerge) else "single"


def pass_rows(batch, seq, tokens_per_pass):
    """Prompts in one forward/backward pass: ``training.passes`` packs prompts while rows × longest stays within
    ``train_tokens_per_pass`` (at least one prompt); none set: the whole batch."""
    return max(1, min(batch, int(tokens_per_pass) // seq)) if tokens_per_pass else batch


def specs(config, shape, cuda, world=1):
    """(Training, Merge or None, LearnedFit or None, Scoring, lines saying what was assumed) of a run with
    ``config`` on ``shape``."""
    kind = model_kind(config)  # first: another model has none of the LLM keys read below
    w = weight_bytes(config["llm_dtype"], cuda)
    targets = lora_targets(config["lora_target_modules"])
    r = int(config["lora_r"])
    listed = int(config["num_prompt_candidates"]) if config["prompt_candidates"] else 0
    answer = int(config["max_title_tokens"]) + END_OF_TURN_TOKENS
    seq = prompt_tokens(config, listed) + answer
    batch = math.ceil(int(config["train_batch_size"]) / max(1, world))  # each process takes its share
    per_pass = config["train_tokens_per_pass"]
    rows = pass_rows(batch, seq, per_pass)
    autocast = cuda or bool(config["train_bf16"])
    train = F.Training(rows=rows, seq=seq, answer=answer, r=r, targets=targets,
                       dropout=float(config["lora_dropout"] or 0), weight_bytes=w, autocast=autocast,
                       checkpointing=bool(config["gradient_checkpointing"]), fused_dropout=cuda,
                       attention="eager" if config["train_attention"] == "eager" else "sdpa")
    merge = None
    if kind != "single":
        from recbole_weaverec.data.crossdomain import domain_list

        k = len(domain_list(config, "source_domains")) + 1
        if kind == "weaverec":  # a learned merge is folded with its learned rows: the `weights` rule
            method = "average" if config["weave_merge"] == "average" else "weights"
            copy = bool(config["weave_compare_target_only"])
        else:
            method, copy = config["merge_method"], False
        merge = F.Merge(k=k, r=r, targets=targets, method=method, weight_bytes=w, host=not cuda,
                        target_only_copy=copy)
    n, in_prompt = eval_candidates(config)
    chunk = int(config["score_chunk_size"]) if n is None else min(int(config["score_chunk_size"]), n)
    copy = F.adapted_weights(shape, targets) * w if merge is not None and merge.target_only_copy and not cuda else 0
    score = F.Scoring(prompt=prompt_tokens(config, n if in_prompt else 0), answer_inputs=answer - 1, chunk=chunk,
                      users=int(config["score_users_per_batch"] or 1), weight_bytes=w, target_only_copy=copy)
    assumed = [f"longest training sequence {seq} tokens (prompt ≤ {seq - answer} + answer {answer}; titles at "
               f"max_title_tokens={config['max_title_tokens']}), {rows} of {batch} prompts per pass"
               + (f" (train_tokens_per_pass={per_pass})" if per_pass else ""),
               f"scoring: prompt ≤ {score.prompt} tokens, {chunk} candidates × {answer - 1} tokens per chunk pass, "
               f"{score.users} user(s) per forward"
               + ("" if n is not None else " (full ranking: every item, score_chunk_size per pass)")]
    fit = None
    if merge is not None:
        assumed.append(f"merge of K={merge.k} adapters ({merge.method})")
    if kind == "weaverec" and config["weave_merge"] == "learned":
        listed = n or 30  # full ranking: a validation user's own rows (taken as a uni29 list here)
        fit = F.LearnedFit(k=merge.k, r=r, targets=targets, prompt=prompt_tokens(config, listed if in_prompt else 0),
                           answer_inputs=answer - 1, candidates=listed, weight_bytes=w)
        assumed.append(f"weave_merge=learned: λ fitted on one validation user per step, its {listed} candidates "
                       f"in one pass with the autograd graph")
    return train, merge, fit, score, assumed


def phases(config, shape, cuda, world=1):
    train, merge, fit, score, assumed = specs(config, shape, cuda, world)
    out = [F.training(shape, train)]
    if fit is not None:
        out.append(F.learned_fit(shape, fit))
    if merge is not None:
        out.append(F.merging(shape, merge))
    out.append(F.scoring(shape, score))
    return out, assumed
