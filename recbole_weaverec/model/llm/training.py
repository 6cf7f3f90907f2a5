"""LoRA training and peft adapter folders, reusable by every LLM model (LLMRec, LLMJoint, LLMMerge, WeaveRec);
the samples they train on are built in ``samples.py``:
- ``answer_loss``: cross-entropy over the answer tokens only.
- ``LoraSettings.from_config`` + ``add_lora`` + ``train_lora``: one LoRA trained on a list of samples.
- ``train_adapter(base, samples, ..., folder)``: the above, saved as a peft folder; the base comes back clean.
- ``save_adapter`` / ``load_adapter`` / ``check_adapter_base``: peft folders with the base model's name checked.
"""
import json
import math
import os
import shutil
from logging import getLogger
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from recbole_weaverec import distributed
from recbole_weaverec.compat import release_memory
from recbole_weaverec.files import replacing
from recbole_weaverec.merging import AdapterMismatchError  # one error type for adapter mismatches (re-exported)
from recbole_weaverec.merging import AdapterFileError, AdapterNotFoundError, check_adapter_folder
from recbole_weaverec.model.llm.backbone import base_name
from recbole_weaverec.model.llm.prompts import IGNORE_INDEX
from recbole_weaverec.model.llm.samples import collate, encode_sample
from recbole_weaverec.model.llm.train_modes import (attention_kernel, autocast, checkpointing, compile_wanted,
                                                    compiled_layers, frozen_weights_as)

ALL_LINEAR = "all-linear"
META_FILE = "recbole_weaverec.json"  # what an adapter folder was trained on (next to peft's files)


def answer_loss(model, batch):
    """Mean cross-entropy over the answer tokens. The vocabulary projection (21% of SmolLM2's matmul work per
    token, and a 49k-wide softmax) runs only on the last positions, which hold every answer (left padding)."""
    labels = batch["labels"]
    width = int((labels != IGNORE_INDEX).sum(1).max())
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False)  # no cache to build
    logits = out.logits[:, :-1].float()  # position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             labels[:, -width:].reshape(-1), ignore_index=IGNORE_INDEX)


# --- LoRA -------------------------------------------------------------------------------------------------------
@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: object = ALL_LINEAR
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 16
    clip_grad_norm: float = 1.0
    bf16: bool = False  # autocast on CPU (always on CUDA), frozen weights held in bf16 while training
    tokens_per_pass: int = 0  # padded tokens per forward/backward pass (0 = the whole batch in one pass)
    gradient_checkpointing: bool = False
    length_buckets: int = 0  # sort prompts by length within windows of this many batches (0 = off)
    seed: int = 2020
    valid_items: bool = False  # each domain's validation transitions are trained on too (train_valid_items)
    attention: object = None  # attention kernel while training (train_attention); None = the model's own
    compile: object = False  # decoder layers compiled while training (train_compile: auto | True | False)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config):
        target = config["lora_target_modules"]
        return cls(r=int(config["lora_r"]), alpha=float(config["lora_alpha"]), dropout=float(config["lora_dropout"]),
                   target_modules=target if isinstance(target, str) else list(target),
                   learning_rate=float(config["learning_rate"]), warmup_ratio=float(config["warmup_ratio"]),
                   weight_decay=float(config["weight_decay"] or 0.0), epochs=int(config["epochs"]),
                   batch_size=int(config["train_batch_size"]), grad_accum=int(config["gradient_accumulation_steps"]),
                   clip_grad_norm=float(config["lora_clip_grad_norm"] or 0.0), bf16=bool(config["train_bf16"]),
                   tokens_per_pass=int(config["train_tokens_per_pass"] or 0),
                   gradient_checkpointing=bool(config["gradient_checkpointing"]),
                   length_buckets=int(config["train_length_buckets"] or 0), seed=int(config["seed"]),
                   valid_items=bool(config["train_valid_items"]), attention=config["train_attention"],
                   compile=config["train_compile"])

    def lora_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM", bias="none")


def add_lora(model, settings, adapter_name="default"):
    """Wrap ``model`` (modified in place) in a PeftModel with a fresh, seeded LoRA; only LoRA weights train."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        lora_config = settings.lora_config()
        lora_config.base_model_name_or_path = base_name(model)  # adapter_config.json names the base model
        peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    return peft_model


def batches(samples, batch_size, seed, epoch, lengths=None, buckets=0):
    """Seeded batches of one epoch. With ``lengths`` and ``buckets``: the shuffled prompts are sorted by length
    within windows of ``buckets`` batches (little padding), and the batches are shuffled again."""
    rng = np.random.default_rng([int(seed), 11, int(epoch)])
    order = rng.permutation(len(samples))
    if lengths is not None and buckets > 1:
        window = batch_size * int(buckets)
        order = np.concatenate([sorted(order[w:w + window], key=lambda i: lengths[i])
                                for w in range(0, len(order), window)]) if len(order) else order
    groups = [order[s:s + batch_size] for s in range(0, len(samples), batch_size)]
    if lengths is not None and buckets > 1:
        groups = [groups[i] for i in rng.permutation(len(groups))]
    return [[samples[i] for i in g] for g in groups]


def passes(encoded, tokens_per_pass):
    """``encoded`` split, in order, into runs whose padded size (rows x longest) stays within ``tokens_per_pass``
    (a run holds at least one prompt; 0 = one run)."""
    if not tokens_per_pass:
        return [encoded] if encoded else []
    out, run = [], []
    for e in encoded:
        if run and max(len(x[0]) for x in run + [e]) * (len(run) + 1) > tokens_per_pass:
            out.append(run)
            run = []
        run.append(e)
    return out + ([run] if run else [])


def answer_tokens(encoded):
    return sum(t != IGNORE_INDEX for t in encoded[1])


class LoraLearner:
    """AdamW over the trainable (LoRA) weights with a warmup + cosine schedule, stepped every ``grad_accum`` batches."""

    def __init__(self, model, settings, n_samples):
        from transformers import get_cosine_schedule_with_warmup

        self.model, self.settings = model, settings
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        steps_per_epoch = math.ceil(math.ceil(n_samples / settings.batch_size) / settings.grad_accum)
        self.total_steps = max(1, steps_per_epoch * settings.epochs)
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(settings.warmup_ratio * self.total_steps), self.total_steps)
        self.tokens = 0  # non-pad tokens seen (for speed reports)
        self._encoded = {}

    def epoch(self, samples, builder, domains, epoch, progress=False, desc="training LoRA"):
        """One pass over ``samples``; returns the mean answer-token loss."""
        from tqdm.auto import tqdm

        model, s = self.model, self.settings
        device = next(model.parameters()).device
        pad_id = builder.tokenizer.pad_token_id
        total, count = 0.0, 0
        encoded = self._encoded  # prompts are tokenised once, not once per epoch
        for x in samples:
            if x not in encoded:
                encoded[x] = encode_sample(x, builder, domains)
        lengths = [len(encoded[x][0]) for x in samples] if s.length_buckets > 1 else None
        groups = batches(samples, s.batch_size, s.seed, epoch, lengths, s.length_buckets)
        low = torch.bfloat16 if (device.type == "cuda" or s.bf16) else None
        compiled = compile_wanted(s.compile, device, len(samples) * s.epochs)
        self.optimizer.zero_grad(set_to_none=True)
        model.train()
        with frozen_weights_as(model, low), checkpointing(model, s.gradient_checkpointing), \
                attention_kernel(model, s.attention), compiled_layers(model, compiled, fallback=s.compile == "auto"):
            for i, group in enumerate(tqdm(groups, desc=f"{desc} epoch {epoch}", unit="batch",
                                           disable=not progress)):
                # data-parallel runs: this process's shard of the global batch, weighted by its share of answer
                # tokens (one process: the whole batch, weight 1); gradients are summed over processes before each
                # step. Within a shard, passes of at most tokens_per_pass padded tokens, weighted the same way.
                mine, weight = distributed.shard_batch([encoded[x] for x in group], size=answer_tokens)
                count += 1
                mine_tokens = max(1, sum(answer_tokens(e) for e in mine))
                for run in passes(mine, s.tokens_per_pass):
                    share = weight * sum(answer_tokens(e) for e in run) / mine_tokens
                    batch = {k: v.to(device) for k, v in collate(run, pad_id).items()}
                    with autocast(device, s.bf16):
                        loss = answer_loss(model, batch)
                    if not torch.isfinite(loss):
                        raise ValueError(f"training loss is {loss.item()} at epoch {epoch}, batch {i}")
                    (loss * share / s.grad_accum).backward()
                    self.tokens += int(batch["attention_mask"].sum())
                    total += loss.item() * share
                if (i + 1) % s.grad_accum == 0 or i + 1 == len(groups):
                    self._step()
        model.eval()
        return distributed.all_reduce_sum(total) / max(count, 1)

    def _step(self):
        distributed.all_reduce_grads(self.params)
        if self.settings.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.clip_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def train_lora(peft_model, samples, builder, domains, settings, progress=False, logger=None, desc="training LoRA"):
    """Train the active LoRA of ``peft_model`` on ``samples`` for ``settings.epochs`` epochs (no validation)."""
    learner = LoraLearner(peft_model, settings, len(samples))
    for epoch in range(settings.epochs):
        loss = learner.epoch(samples, builder, domains, epoch, progress, desc)
        if logger is not None:
            logger.info(f"{desc}: epoch {epoch} train loss {loss:.4f} ({len(samples)} samples)")
    return learner


# --- adapter folders --------------------------------------------------------------------------------------------
def adapter_meta(peft_model, samples, settings, **extra):
    by_domain = {}
    for s in samples:
        by_domain[s.domain] = by_domain.get(s.domain, 0) + 1
    meta = {"base_model": base_name(peft_model), "samples": by_domain, "settings": asdict(settings)}
    meta["settings"].pop("extra", None)
    meta.update(extra)
    return meta


def save_adapter(peft_model, folder, meta=None):
    """Write the active adapter as a peft folder (atomic: a half-written folder never appears). In a data-parallel
    run rank 0 writes it and every rank returns once it is there."""
    folder = Path(folder)
    if not distributed.is_main():
        distributed.barrier()
        return folder
    with replacing(folder, folder=True) as tmp:
        peft_model.save_pretrained(str(tmp))
        if peft_model.active_adapter != "default":  # peft writes non-default adapters into a sub-folder
            sub = tmp / peft_model.active_adapter
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        (tmp / META_FILE).write_text(json.dumps(meta or {"base_model": base_name(peft_model)}, indent=1))
    distributed.barrier()
    return folder


def adapter_base_name(folder):
    folder = Path(folder)
    meta = folder / META_FILE
    if meta.is_file():
        return json.loads(meta.read_text()).get("base_model")
    return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")


def check_adapter_base(folder, model):
    """Refuse an adapter folder that is missing or was trained on another base model (one line, both names)."""
    folder = Path(os.path.expanduser(str(folder)))
    check_adapter_folder(folder)  # missing files, malformed JSON, truncated weights, a rank the weights lack
    theirs, ours = adapter_base_name(folder), base_name(model)
    if theirs != ours:
        raise AdapterMismatchError(f"adapter {folder} was trained on base model {theirs!r}, not on this run's "
                                   f"base model {ours!r}")
    return folder


def load_adapter(model, folder, adapter_name="default", trainable=False):
    """``model`` (modified in place) wrapped in a PeftModel carrying the adapter of ``folder``."""
    from peft import PeftModel

    folder = check_adapter_base(folder, model)
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name, is_trainable=trainable)


def train_adapter(base, samples, builder, domains, settings, folder, progress=False, logger=None, desc=None,
                  **meta):
    """Train a fresh LoRA on ``samples`` over ``base``, save it to ``folder`` (a peft folder) and remove it from
    ``base`` again (``base`` comes back with its original weights). Returns (folder, LoraLearner)."""
    peft_model = add_lora(base, settings)
    try:
        learner = train_lora(peft_model, samples, builder, domains, settings, progress, logger,
                             desc or f"training LoRA {Path(folder).name}")
        save_adapter(peft_model, folder, adapter_meta(peft_model, samples, settings, **meta))
    finally:
        peft_model.unload()  # takes the LoRA layers out; base weights were never touched
        release_memory()  # the next module (or scoring) starts from the model's own footprint
    return Path(folder), learner


def training_key(base, domain_sizes, settings, builder, num_candidates):
    """What determines an adapter's training: equal keys -> an adapter folder can be reused as is."""
    s = asdict(settings)
    s.pop("extra", None)
    s.pop("compile", None)  # how the same arithmetic is executed (like score_chunk_size), not what is trained
    for key in ("valid_items", "attention"):  # only when set: keys of adapters trained before these existed stay valid
        if not s.get(key):
            s.pop(key, None)
    prompt = {"max_history": builder.max_history, "max_title_tokens": builder.max_title_tokens,
              "prompt_candidates": builder.prompt_candidates}
    if builder.max_prompt_tokens is not None:  # only when set: keys of adapters trained without a cap stay valid
        prompt["max_prompt_tokens"] = builder.max_prompt_tokens
    return {"base_model": base, "domains": domain_sizes, "settings": s, "num_candidates": int(num_candidates),
            "prompt": prompt}


def adapter_ready(folder, key):
    """True when ``folder`` holds a finished, intact adapter trained with ``key`` (``ensure_adapter`` reuses it)."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        return False
    try:
        saved = json.loads((folder / META_FILE).read_text()).get("key")
        check_adapter_folder(folder)
    except (ValueError, AttributeError, AdapterFileError, AdapterNotFoundError):
        return False
    return saved == json.loads(json.dumps(key))


def ensure_adapter(base, folder, make_samples, builder, domains, settings, key, progress=False, logger=None):
    """The adapter of ``folder``, trained now unless a finished one with the same training ``key`` is there.

    ``make_samples()`` -> (samples, {domain name: DomainData}) is only called when training is needed (loading a
    source domain is the slow part). A folder holding an adapter trained otherwise is refused, never overwritten.
    """
    folder = Path(folder)
    meta_file = folder / META_FILE
    corrupt = None
    if meta_file.is_file():
        try:
            saved = json.loads(meta_file.read_text()).get("key")
            check_adapter_folder(folder)
        except (ValueError, AttributeError, AdapterFileError, AdapterNotFoundError) as e:
            corrupt = str(e).splitlines()[0] if str(e) else type(e).__name__
    if corrupt is not None:
        # a reused module cut short or overwritten must not fail every run until deleted by hand
        (logger or getLogger()).warning(f"cached adapter {folder} is corrupt ({corrupt}): training it again")
        shutil.rmtree(folder)
    elif meta_file.is_file():
        if saved == json.loads(json.dumps(key)):
            if logger is not None:
                logger.info(f"reusing adapter {folder} (same training settings)")
            return folder
        if saved is None:  # e.g. written by LLMRec before it recorded its training key
            raise AdapterMismatchError(f"{folder} holds an adapter saved without its training settings: pass it "
                                       f"through adapter_paths to use it as it is, or remove it")
        raise AdapterMismatchError(f"{folder} holds an adapter trained with other settings ({saved} vs {key}); "
                                   f"remove it or choose another adapter_dir")
    samples, extra_domains = make_samples()
    train_adapter(base, samples, builder, {**domains, **extra_domains}, settings, folder, progress, logger,
                  key=key)
    if logger is not None:
        logger.info(f"adapter saved: {folder}")
    return folder
