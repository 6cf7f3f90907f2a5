"""Learned MergeRec coefficients, reused across runs: the merge does not depend on which domain a run reports, so
the board's cells for the other targets (and a rerun) read the coefficients instead of learning them again.

The key covers everything learning reads: the domain models' weights (a digest of the tensors, however they were
obtained), every domain's data files, the base encoder, the student's text settings and precision, and the merge
settings with the seed. The file is JSON (no pickle); one that does not parse or does not fit is learned again.
"""
import hashlib
import json
import math
from logging import getLogger
from pathlib import Path

import torch

from recbole_weaverec.files import replacing
from recbole_weaverec.model.twotower.domains import (TRAINING_KEYS, _file_stamp, default_cache_dir,
                                                     encoder_identity, training_autocast)

# merge settings that change the learned coefficients (display, cache and evaluation keys are left out)
LEARNING_KEYS = ("merge_domains", "merge_init", "merge_granularity", "merge_layer_groups", "merge_coefficient",
                 "merge_vector_dtype", "merge_density", "merge_steps", "merge_batch_size", "merge_lr", "kd_weight",
                 "kd_temperature", "merge_valid_ratio", "merge_valid_every", "seed")


def state_digest(state):
    """sha256 over a state dict's names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def coefficients_path(config, tconfig, dconfigs, model_digests, encoder_path):
    """Where the coefficients of this merge are kept (``merge_cache_dir``, default ~/.cache/recbole_weaverec/mergerec).
    ``dconfigs``: each merged domain's TextSeqRec config; ``model_digests``: ``state_digest`` of each domain model."""
    data = {}
    for d in dconfigs:
        folder, name = d["data_path"], d["dataset"]
        data[name] = [_file_stamp(str(Path(folder) / f"{name}.{ext}")) for ext in ("inter", "item")
                      if (Path(folder) / f"{name}.{ext}").is_file()]
    payload = {"merge": {k: config[k] for k in LEARNING_KEYS}, "models": list(model_digests), "data": data,
               "student": {k: tconfig[k] for k in TRAINING_KEYS}, "encoder": encoder_identity(encoder_path),
               "autocast": str(training_autocast(tconfig)), "encode_batch_size": tconfig["encode_batch_size"]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = Path(str(config["merge_cache_dir"])).expanduser() if config["merge_cache_dir"] else default_cache_dir()
    return folder / f"coefficients-{key}.json"


def load_coefficients(path, shape):
    """(coefficients tensor, info dict) saved at ``path``, or None (warned when the file is there but bad)."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        values = torch.tensor(saved["coefficients"], dtype=torch.float32)
        info = dict(saved.get("info") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        getLogger().warning(f"MergeRec: {path} is unreadable ({type(e).__name__}: {e}): learning the coefficients again")
        return None
    if tuple(values.shape) != tuple(shape) or not torch.isfinite(values).all():
        getLogger().warning(f"MergeRec: {path} holds coefficients of shape {tuple(values.shape)} (expected "
                            f"{tuple(shape)}) or non-finite values: learning them again")
        return None
    return values, info


def save_coefficients(path, values, info):
    """Written whole or not at all (an interrupted run leaves nothing to be reused)."""
    info = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in info.items()}
    with replacing(path) as tmp:
        Path(tmp).write_text(json.dumps({"coefficients": values.detach().cpu().tolist(), "info": info}))
