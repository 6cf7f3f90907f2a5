"""The shared text tower of TextSeqRec / MergeRec: an HF encoder over pre-tokenised item texts, CLS or mean pooled.

Item texts are tokenised once: each attribute value ("title", "brand", "category") cut to ``max_attribute_tokens``
on its own, as the MergeRec authors do, so a long title cannot push brand and category out; the joined labelled text
is then optionally cut to ``max_item_tokens`` as a whole. A user's input is built from those token ids (most recent
item first, joined by the tokenised "; ", cut to ``max_user_tokens``), so no batch re-tokenises text. ``params``
lets a caller run the encoder with other weights (e.g. merged weights that depend on learnable coefficients, or a
domain's fine-tuned weights) through ``torch.func.functional_call`` without touching the module's own parameters,
and ``encoder`` lets several towers (one per domain's item texts) share one encoder module.
``precision``: ``auto`` runs the encoder under bf16 autocast on CUDA and in fp32 elsewhere (the CPU path is the
plain fp32 one), ``fp32`` never autocasts, ``bf16`` autocasts on any device; pooled embeddings are always fp32.
"""
import json
import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.func import functional_call

from recbole_weaverec.textembed import mean_pool

POOLINGS = ("cls", "mean")
PRECISIONS = ("auto", "fp32", "bf16")


def autocast_dtype(precision, device_type):
    """torch.bfloat16 where ``precision`` asks for bf16 autocast on ``device_type``, else None (fp32)."""
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def default_pooling(encoder_path):
    """``mean`` for a sentence-transformers folder whose pooling config says mean (the embedded all-MiniLM-L6-v2),
    else ``cls`` (BERT/RoBERTa-style encoders such as BLaIR, the official MergeRec code's default)."""
    config = os.path.join(str(encoder_path), "1_Pooling", "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            if json.load(f).get("pooling_mode_mean_tokens"):
                return "mean"
    return "cls"


def attribute_text(tokenizer, attributes, max_attribute_tokens=None):
    """ "label: value label: value" with each value cut to ``max_attribute_tokens`` tokens on its own."""
    parts = []
    for label, value in attributes:
        if not value:
            continue
        if max_attribute_tokens is not None:
            tokens = tokenizer.tokenize(value)
            if len(tokens) > max_attribute_tokens:
                value = tokenizer.convert_tokens_to_string(tokens[:max_attribute_tokens])
        parts.append(f"{label}: {value}")
    return " ".join(parts)


class TextTower(torch.nn.Module):
    """``items``: per internal item id, a list of (label, value) attributes ([] for the padding item)."""

    def __init__(self, encoder_path, items, max_item_tokens, max_user_tokens, max_seq_items,
                 max_attribute_tokens=None, pooling=None, precision="auto", encoder=None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.encoder_path = encoder_path
        self.tokenizer = AutoTokenizer.from_pretrained(encoder_path)
        # a shared module is not loaded again: MergeRec's per-domain towers all run the one merged encoder
        self.encoder = encoder if encoder is not None else AutoModel.from_pretrained(encoder_path)
        self.pooling = pooling or default_pooling(encoder_path)
        self.precision = precision or "auto"
        self.max_user_tokens = int(max_user_tokens)
        self.max_seq_items = int(max_seq_items)
        texts = [attribute_text(self.tokenizer, attrs, max_attribute_tokens) for attrs in items]
        whole = {} if max_item_tokens is None else {"truncation": True, "max_length": int(max_item_tokens)}
        ids = self.tokenizer(texts, add_special_tokens=False, **whole)["input_ids"]
        self.item_ids = [list(x) for x in ids]
        self.sep_ids = self.tokenizer("; ", add_special_tokens=False)["input_ids"]
        self.prefix, self.suffix = self._special_template()

    def _special_template(self):
        """The special tokens the tokenizer puts around one text (e.g. [CLS] … [SEP] or <s> … </s>)."""
        plain = self.tokenizer("item", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("item")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start], full[start + len(plain):]
        return [], []

    def _with_special(self, ids, budget):
        return self.prefix + ids[:max(budget - len(self.prefix) - len(self.suffix), 0)] + self.suffix

    def item_inputs(self, items):
        if torch.is_tensor(items):
            items = items.tolist()  # one transfer for the batch: int() per element would sync a GPU once per item
        return [self.prefix + self.item_ids[i] + self.suffix for i in items]

    def user_inputs(self, item_seq, item_seq_len):
        """Token ids per user: history most recent first, at most max_seq_items items, joined by "; "."""
        out = []
        seqs = item_seq.tolist()
        for row, n in zip(seqs, item_seq_len.tolist()):
            history = row[:n][::-1][:self.max_seq_items]
            ids = []
            for k, item in enumerate(history):
                if k:
                    ids += self.sep_ids
                ids += self.item_ids[item]
                if len(ids) >= self.max_user_tokens:
                    break
            out.append(self._with_special(ids, self.max_user_tokens))
        return out

    def pool(self, hidden, mask):
        if self.pooling == "mean":
            return mean_pool(hidden, mask)
        # the first real token ([CLS] / <s>): position 0 with right padding, still right if a tokenizer pads left
        first = mask.long().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]

    def encode(self, inputs, params=None):
        """L2-normalised pooled embeddings of a list of token-id lists (gradients flow unless disabled)."""
        device = next(self.encoder.parameters()).device
        batch = self.tokenizer.pad({"input_ids": inputs}, return_tensors="pt").to(device)
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        dtype = autocast_dtype(self.precision, device.type)
        with torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext():
            if params is None:
                hidden = self.encoder(**kwargs).last_hidden_state
            else:
                hidden = functional_call(self.encoder, params, args=(), kwargs=kwargs, strict=False).last_hidden_state
        # pooling, normalisation and every score after them in fp32, whatever the encoder ran in
        return F.normalize(self.pool(hidden.float(), batch["attention_mask"]), dim=-1)

    @torch.no_grad()
    def encode_all(self, inputs, batch_size, params=None, progress=False, desc="encoding items"):
        from tqdm.auto import tqdm

        # longest first so each batch pads little; rows go back to the input order
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]))
        out = None
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            idx = order[start:start + batch_size]
            emb = self.encode([inputs[i] for i in idx], params=params)
            if out is None:
                out = emb.new_empty(len(inputs), emb.shape[1])
            out[torch.tensor(idx, device=emb.device)] = emb
        return out
