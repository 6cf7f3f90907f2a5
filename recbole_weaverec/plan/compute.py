"""Compute of a run's scoring, from the LM's shape and the planned token counts: the FLOPs of one user and the time
per 1,000 users at a sustained rate the user gives (``--tflops``; a device's sustained rate is a measurement, not
something a formula knows). Counted as the package's scorer runs (``model.llm.scoring``): one causal pass over the
prompt, then ceil(n / chunk) packed passes of chunk × (answer - 1) tokens that attend, densely under a block mask, to
the prompt and the whole chunk; the vocabulary projection runs on the answer tokens (and the prompt's last token) only.
Matmuls only (2 FLOPs per multiply-add): norms, softmax and rotary embeddings are a few percent at these shapes.
``tests/test_plan.py`` checks the count against torch's FlopCounterMode on the real scorer."""
import math
from dataclasses import dataclass


def linear_flops(shape, tokens):
    """The decoder layers' linear projections over ``tokens`` tokens."""
    return 2 * tokens * shape.layers * sum(a * b for a, b in shape.linears().values())


def attention_flops(shape, queries, keys):
    """QKᵀ and the weighted sum of V for ``queries`` tokens over ``keys`` positions, every head, every layer."""
    return 4 * shape.layers * shape.q * queries * keys


def head_flops(shape, tokens):
    return 2 * tokens * shape.hidden * shape.vocab


@dataclass(frozen=True)
class ScoringCompute:
    prompt: int  # prompt tokens
    answer_inputs: int  # tokens of one candidate's answer fed to the model
    candidates: int  # candidates scored per user
    chunk: int  # candidates per packed pass (score_chunk_size)


def scoring_flops(shape, s):
    """FLOPs of scoring one user by likelihood: {part: FLOPs}."""
    full, rest = divmod(s.candidates, s.chunk)
    chunks = [s.chunk] * full + ([rest] if rest else [])
    answers = s.candidates * s.answer_inputs
    return {
        "prompt pass": linear_flops(shape, s.prompt) + attention_flops(shape, s.prompt, s.prompt) / 2
                       + head_flops(shape, 1),  # causal attention: half the score matrix; logits of its last token
        "answer passes": linear_flops(shape, answers) + head_flops(shape, answers)
                         + sum(attention_flops(shape, c * s.answer_inputs, s.prompt + c * s.answer_inputs)
                               for c in chunks),
    }


def per_thousand_users(total_flops, tflops):
    """Seconds to score 1,000 users at a sustained ``tflops`` (10¹² FLOP/s)."""
    return 1000 * total_flops / (tflops * 1e12)


def describe(shape, s, tflops=None):
    """Lines for the planner: the FLOPs of one user and, with ``tflops``, the time per 1,000 users."""
    parts = scoring_flops(shape, s)
    total = sum(parts.values())
    lines = [f"compute: scoring {total / 1e12:.3g} TFLOP per user (" + ", ".join(
        f"{k} {v / 1e12:.3g}" for k, v in parts.items()) + f"; {s.candidates} candidates in "
        f"{math.ceil(s.candidates / s.chunk)} chunk pass(es))"]
    if tflops:
        sec = per_thousand_users(total, tflops)
        lines.append(f"time: scoring ~{sec / 60:.3g} min per 1,000 users at a sustained {tflops:g} TFLOP/s "
                     f"(--tflops; a rate, not a measurement of this device)")
    else:
        lines.append("time: give --tflops R (the device's sustained matmul rate in TFLOP/s) for minutes "
                     "per 1,000 users")
    return lines
