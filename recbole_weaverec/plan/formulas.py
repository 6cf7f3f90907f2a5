"""The planner's formulas: bytes of device memory at the peak of each heavy phase, as a sum of named terms.

Everything is counted from what the package's code paths keep alive (``model.llm.training``, ``model.llm.scoring``,
``merging.streaming``), for a Llama-layout decoder (llama, mistral, qwen2, qwen3). Symbols: h hidden size, i MLP
width, q = heads × head_dim, kv = kv_heads × head_dim, L layers, V vocabulary, N tokens in one pass, b bytes of an
activation (2 under bf16 autocast, 4 in float32).

Training (one forward + backward of one pass of ``rows`` prompts padded to ``seq`` tokens):
  weights            params × bytes of llm_dtype, + params × 2 when the frozen weights are held in bf16 while
                     training and llm_dtype is not bf16 (``frozen_weights_as`` keeps the original until the end)
  LoRA               P_lora × 16: fp32 weights, fp32 gradients and AdamW's two fp32 moments
  activations        saved for backward per token and layer (autocast bf16, LoRA on every linear layer):
                     22h + 8q + 4kv + 10i bytes = 12h (two RMSNorms: fp32 input + bf16 output each)
                     + 6q + 4kv (RoPE'd q, k, v, attention output and its contiguous copy) + 8i (gate, silu, up,
                     product) + 2·in for each LoRA layer (peft casts its input to fp32; autocast casts it back to a
                     bf16 copy that the LoRA matmul keeps), + 4·in per LoRA layer with dropout (CPU keeps the fp32
                     noise; CUDA's fused dropout a 1-byte mask); in float32: 16h + 12q + 8kv + 16i, LoRA inputs
                     shared with the base layer (+8·in with dropout: the noise and the dropped copy).
                     Without checkpointing every layer keeps its set: N·L·A. With gradient checkpointing a layer
                     keeps its input only (N·L·b·h) and backward recomputes one layer at a time: + N·A + N·8i
                     (that layer's activation gradients: ~4 i-wide bf16 or 2 fp32 tensors at once), or the logits
                     below if they are larger (they are freed before the first layer is recomputed). Padded rows (rows > 1) need an attention mask: each
                     layer then keeps it converted to b bytes (rows × seq² × b) and k, v repeated to every head
                     (+2b(q − kv) per token), as sdpa has no GQA kernel with a mask.
  logits             rows × (answer + 1) × V × (b + 4 + 4 + 4): the LM head runs on the answer positions only
                     (bf16 logits, their fp32 copy, log-softmax kept for backward, its gradient)
  attention mask     rows × seq² bytes (bool) when rows > 1 (left padding), shared by the layers
  eager attention    (train_attention: eager) instead of sdpa's mask terms: k, v repeated to every head in every
                     case, each layer keeps rows × heads × seq² × (4 + b under autocast) (the fp32 softmax and its
                     bf16 copy), and one additive mask rows × seq² × b is shared by the layers
Merging (``fold_merged`` of K = sources + 1 adapters, one adapted weight at a time):
  weights            params × bytes of llm_dtype
  factors            K × P_lora × 4 when the device is the host (the adapters' factors stay on the CPU)
  one layer's ΔW     c(K) × out × in × 4 for the largest adapted weight: K fp32 ΔW from the factors, peft's
                     stack of them and the weighted stack, + their sum: c = 3K + 1 (average, weights,
                     task_arithmetic, magnitude_prune, dare_linear); TIES / DARE-TIES add the pruned copies, the
                     sign mask, the masked stack and an int64 sign: c = 5.25K + 3 (fitted to peft's code on CPU)
  θ0 copy            WeaveRec with ``weave_compare_target_only``: the adapted weights' W0 on the host
Fitting a learned merge (WeaveRec ``weave_merge: learned``; ``FactorMerge`` hooks, one user's prompt and all its
N_c candidates in one pass with the graph kept, tokens N = P + N_c·T, no autocast):
  weights + factors  params × s + K × P_lora × 4 (the factors move to the device)
  activations        N × L × (2(4 + s)h + s(3q + 2kv) + 4s·i + K × 4 × Σ out): every layer depends on λ, so all
                     keep their activations, and each adapted layer keeps K fp32 products (x·Aᵀ)·Bᵀ of its output
                     width for ∂/∂λ
  logits, KV cache   N_c·T × V × (s + 12); N × L × 2 × kv × s
 / ``score_users`` of B users, C candidates per chunk of T answer tokens, CT = C·T):
  weights            params × bytes of llm_dtype (s bytes per number)
  KV cache           B × (P + CT) × L × 2 × kv × s
  chunk pass         the bool block mask B × CT × (P + CT) + the largest of: logits (one user: CT × V × 8, the
                     fp32 copy and logsumexp's temporary; B > 1: B × CT × V × s + CT × V × (4 if s ≠ 4) + CT × V
                     × 4), the MLP B × CT × (3i + 4h) × s, attention B × (CT × (P + CT) + 2 × (P + CT) × q) × s
                     (the mask in the model's dtype, k and v repeated to every head)
  prompt pass        B × P × (3i + 4h) × s; B > 1 adds a mask (B × P² bytes, and B × (P² + 2·P·q) × s in
                     attention); the larger of the two passes counts
"""
from dataclasses import dataclass, field

GIB = 2 ** 30
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SIGN_METHODS = ("ties", "dare_ties")


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama-layout causal LM that memory depends on (from its config; no weights)."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    name: str = "?"

    @property
    def q(self):
        return self.heads * self.head_dim

    @property
    def kv(self):
        return self.kv_heads * self.head_dim

    def linears(self):
        """{module name: (in features, out features)} of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def params(self):
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        per_layer += (self.q + 2 * self.kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * per_layer + self.vocab * self.hidden + head + self.hidden


def lora_params(shape, r, targets):
    return shape.layers * sum(r * (a + b) for name, (a, b) in shape.linears().items() if name in targets)


def adapted_weights(shape, targets):
    return shape.layers * sum(a * b for name, (a, b) in shape.linears().items() if name in targets)


@dataclass
class Phase:
    name: str
    terms: list = field(default_factory=list)  # [(label, bytes)]
    note: str = ""

    def add(self, label, nbytes):
        if nbytes:
            self.terms.append((label, int(nbytes)))

    @property
    def total(self):
        return sum(b for _, b in self.terms)


@dataclass(frozen=True)
class Training:
    rows: int  # prompts in one forward/backward pass (train_tokens_per_pass splits a batch into passes)
    seq: int  # tokens of the longest prompt + its answer (every row is padded to it)
    answer: int  # answer tokens of that prompt (the positions the LM head runs on)
    r: int
    targets: tuple
    dropout: float = 0.0
    weight_bytes: int = 4  # frozen weights as loaded (llm_dtype)
    autocast: bool = True  # bf16 autocast, frozen weights held in bf16 (always on CUDA; train_bf16 on CPU)
    checkpointing: bool = True
    fused_dropout: bool = False  # CUDA: dropout keeps a bool mask, not an fp32 noise tensor
    attention: str = "sdpa"  # train_attention: eager keeps each layer's softmax for backward


def activation_bytes(shape, t):
    """Bytes saved for backward per token by one decoder layer (see the module docstring)."""
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q, shape.kv
    lora_in = sum(a for name, (a, _) in shape.linears().items() if name in t.targets)
    qk_norm = shape.qk_norm * (q + kv)  # qwen3's RMSNorm of q and k: one more norm's worth of their width
    # dropout on a LoRA input: CPU keeps its fp32 noise tensor (4·in; + the fp32 output that lora_A keeps when
    # nothing casts it); CUDA's fused kernel keeps a bool mask (1·in)
    drop = (t.dropout > 0) * ((1 if t.fused_dropout else 4) + (0 if t.autocast else 4))
    if t.autocast:
        return 12 * h + 6 * q + 4 * kv + 8 * i + 6 * qk_norm + (2 + drop) * lora_in
    return 16 * h + 12 * q + 8 * kv + 16 * i + 8 * qk_norm + drop * lora_in


def training(shape, t):
    p = Phase("training")
    n = t.rows * t.seq
    b = 2 if t.autocast else 4
    params = shape.params()
    p.add(f"weights {params / 1e9:.2f}B × {t.weight_bytes} B", params * t.weight_bytes)
    if t.autocast and t.weight_bytes != 2:
        p.add("bf16 copy of the frozen weights", params * 2)
    lora = lora_params(shape, t.r, t.targets)
    p.add(f"LoRA {lora / 1e6:.1f}M + grads + AdamW (fp32)", lora * 16)
    a = activation_bytes(shape, t)
    # padded rows need a mask: sdpa then gets k, v repeated to every head (no GQA kernel) and keeps, per layer, the
    # mask converted to the activations' dtype
    masked = t.rows > 1
    a += masked * 2 * b * (shape.q - shape.kv)
    per_layer_mask = masked * t.rows * t.seq * t.seq * b
    shared_mask = masked * t.rows * t.seq * t.seq  # bool
    if t.attention == "eager":
        # eager always repeats k, v to every head, keeps the fp32 softmax and (autocast) its bf16 copy for the
        # product with v, per layer; its additive float mask is built once and shared by the layers
        a += (not masked) * 2 * b * (shape.q - shape.kv)
        per_layer_mask = t.rows * shape.heads * t.seq * t.seq * (4 + (b if t.autocast else 0))
        shared_mask = t.rows * t.seq * t.seq * b
    logits = t.rows * (t.answer + 1) * shape.vocab * (b + 12)
    logits_label = f"logits {t.rows}×{t.answer + 1}×{shape.vocab}"
    if t.checkpointing:
        p.add(f"layer inputs {n} tok × {shape.layers} layers (checkpointed)", n * shape.layers * b * shape.hidden)
        # the loss's logits are freed before backward recomputes the first layer: one or the other is the peak
        layer = n * (a + 8 * shape.intermediate) + per_layer_mask
        p.add(*((logits_label, logits) if logits > layer else (f"1 recomputed layer + its grads, {n} tok", layer)))
    else:
        p.add(f"activations {n} tok × {shape.layers} layers × {a / 1024:.0f} KiB",
              n * shape.layers * a + shape.layers * per_layer_mask)
        p.add(logits_label, logits)  # backward starts with every activation still saved
    p.add("attention mask" + (" (bool)" if t.attention != "eager" else ""), shared_mask)
    return p


def merge_factor(method, k):
    """Largest-layer fp32 ΔW copies alive at once while one weight's merge is computed (see the docstring)."""
    if method in SIGN_METHODS:
        return 5.25 * k + 3
    return 3 * k + 1


@dataclass(frozen=True)
class Merge:
    k: int  # adapters merged (WeaveRec, LLMMerge: sources + 1)
    r: int
    targets: tuple
    method: str = "average"
    weight_bytes: int = 2
    host: bool = False  # the device is the CPU: the adapters' factors and the θ0 copy share its memory
    target_only_copy: bool = False  # WeaveRec's weave_compare_target_only


def merging(shape, m):
    p = Phase("merge + fold")
    params = shape.params()
    p.add(f"weights × {m.weight_bytes} B", params * m.weight_bytes)
    if m.host:
        p.add(f"{m.k} adapters' LoRA factors (fp32)", m.k * lora_params(shape, m.r, m.targets) * 4)
    largest = max(a * b for name, (a, b) in shape.linears().items() if name in m.targets)
    c = max(merge_factor(m.method, m.k), 3 + (m.weight_bytes != 4))  # fold: ΔW, W in fp32, αΔW, their sum
    p.add(f"{c:g} × largest ΔW ({largest / 1e6:.1f}M, fp32; {m.method}, K={m.k})", c * largest * 4)
    if m.target_only_copy:
        copy = adapted_weights(shape, m.targets) * m.weight_bytes
        if m.host:
            p.add("W0 of the adapted weights (θ0 comparison)", copy)
        else:
            p.note = f"+ {copy / GIB:.1f} GiB of host memory for the θ0 comparison (W0 of the adapted weights)"
    return p


@dataclass(frozen=True)
class Scoring:
    prompt: int  # tokens of the longest prompt
    answer_inputs: int  # tokens of one candidate's answer fed to the model (its last token is only predicted)
    chunk: int  # candidates per chunk pass: min(score_chunk_size, candidates)
    users: int = 1  # score_users_per_batch
    weight_bytes: int = 4
    target_only_copy: int = 0  # bytes of a θ0 comparison copy that shares this device (the CPU)


def scoring(shape, s):
    p = Phase("scoring")
    w = s.weight_bytes
    params = shape.params()
    p.add(f"weights × {w} B", params * w)
    p.add("W0 of the adapted weights (θ0 comparison)", s.target_only_copy)
    ct = s.chunk * s.answer_inputs
    b, q = s.users, shape.q
    kv = b * (s.prompt + ct) * shape.layers * 2 * shape.kv * w
    p.add(f"KV cache {b}×({s.prompt}+{ct}) tok", kv)
    width = 3 * shape.intermediate + 4 * shape.hidden  # the MLP's widest moment + the residual stream's copies
    # one user: the model-dtype logits are let go once their fp32 copy exists (copy + logsumexp's temporary: 8 B);
    # several users: the batch's logits stay while each user's fp32 rows are taken
    logits = ct * shape.vocab * 8 if b == 1 else b * ct * shape.vocab * w + ct * shape.vocab * (4 * (w != 4) + 4)
    # the block mask (bool) lives through the pass; each layer converts it to w bytes and repeats k, v to all heads
    attention = b * ct * (s.prompt + ct) * w + b * 2 * (s.prompt + ct) * q * w
    stages = {"logits": logits, "MLP": b * ct * width * w, "attention": attention}
    stage = max(stages, key=stages.get)
    chunk = stages[stage] + b * ct * (s.prompt + ct)
    # the prompt pass: no mask for one user (causal kernel, GQA); B > 1 left-padded prompts need one
    prompt = {"MLP": b * s.prompt * width * w,
              "attention": (b > 1) * b * (s.prompt ** 2 * w + 2 * s.prompt * q * w)}
    prompt_stage = max(prompt, key=prompt.get)
    prompt_total = prompt[prompt_stage] + (b > 1) * b * s.prompt ** 2
    if chunk >= prompt_total:
        p.add(f"chunk pass ({stage}) of {b}×{ct} tok", chunk)
    else:
        p.add(f"prompt pass ({prompt_stage}) of {b}×{s.prompt} tok", prompt_total)
    return p


@dataclass(frozen=True)
class LearnedFit:
    k: int
    r: int
    targets: tuple
    prompt: int
    answer_inputs: int
    candidates: int  # every candidate goes into one pass (score_candidates(grad=True))
    weight_bytes: int = 2


def learned_fit(shape, f):
    p = Phase("merge λ fit")
    w = f.weight_bytes
    h, i, q, kv = shape.hidden, shape.intermediate, shape.q, shape.kv
    p.add(f"weights × {w} B", shape.params() * w)
    p.add(f"{f.k} adapters' LoRA factors (fp32)", f.k * lora_params(shape, f.r, f.targets) * 4)
    ct = f.candidates * f.answer_inputs
    n = f.prompt + ct
    outs = sum(o for name, (_, o) in shape.linears().items() if name in f.targets)
    per_token = 2 * (4 + w) * h + w * (3 * q + 2 * kv) + 4 * w * i + f.k * 4 * outs
    p.add(f"activations {n} tok × {shape.layers} layers × {per_token / 1024:.0f} KiB (graph kept)",
          n * shape.layers * per_token)
    p.add(f"logits {ct}×{shape.vocab}", ct * shape.vocab * (w + 12))
    p.add(f"KV cache {n} tok", n * shape.layers * 2 * kv * w)
    return p
