"""Per-domain TextSeqRec models for MergeRec: configs, fine-tuning on one domain's own data, saving and reuse.

A domain model is saved as the encoder's state dict (safetensors) with metadata naming the domain, the base
encoder, its vocabulary and hidden size; a model is reused when a later run asks for the same domain data and the
same training settings (cache key), or when ``merge_finetuned`` points at it.
"""
import hashlib
import json
import os
from logging import getLogger
from pathlib import Path

import torch

from recbole_weaverec.config import WeaveConfig
from recbole_weaverec.data.crossdomain import domain_config, raw_data_path
from recbole_weaverec.errors import CacheFileError, DomainModelMismatchError
from recbole_weaverec.files import replacing

# TextSeqRec settings that change what fine-tuning produces (the cache key); display/eval-only keys are left out
TRAINING_KEYS = ("text_fields", "max_item_tokens", "max_attribute_tokens", "pooling", "max_seq_items",
                 "max_user_tokens", "temperature", "softmax", "full_softmax_refresh", "learner", "learning_rate",
                 "weight_decay", "lr_schedule", "warmup_ratio", "warmup_steps", "gradient_accumulation_steps",
                 "epochs", "train_batch_size", "stopping_step", "eval_step", "valid_metric", "seed",
                 "MAX_ITEM_LIST_LENGTH", "clip_grad_norm", "load_col", "eval_args")
MERGE_ONLY_KEYS = ("model",)


def text_config(config, name=None):
    """A TextSeqRec Config for domain ``name`` (default: config's dataset) with the user's settings of ``config``."""
    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec

    name = name or config["dataset"]
    external = {k: v for k, v in config.external_config_dict.items() if k not in MERGE_ONLY_KEYS}
    external.update(dataset=name, data_path=raw_data_path(config))
    tconfig = WeaveConfig(model=TextSeqRec, dataset=name, config_dict=external)
    TextSeqRec.validate_config(tconfig)
    return tconfig


def domain_text_config(tconfig, name):
    """The TextSeqRec config of another domain, same settings (crossdomain.domain_config on a TextSeqRec config)."""
    return tconfig if name == tconfig["dataset"] else domain_config(tconfig, name)


_DIGESTS = {}  # (path, size, mtime_ns) -> sha256: each file hashed once per process


def _file_stamp(path):
    """[name, size, sha256 of the contents]: a fresh copy of the same data (new mtime) keeps its domain models."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return [os.path.basename(path), st.st_size, _DIGESTS[key]]


def encoder_identity(path):
    if not os.path.isdir(path):
        return str(path)
    files = sorted(p for p in Path(path).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt",
                                                                                    ".bin", ".model"))
    return json.dumps([_file_stamp(p) for p in files])  # contents only: the same encoder in another folder is equal


def cache_key(dconfig, encoder_path):
    """Hash of the domain's files, the base encoder and the training settings."""
    folder = dconfig["data_path"]  # RecBole's data_path is already data_path/dataset
    name = dconfig["dataset"]
    files = [os.path.join(folder, f"{name}.{ext}") for ext in ("inter", "item")]
    settings = {k: dconfig[k] for k in TRAINING_KEYS}
    if training_autocast(dconfig) is not None:  # only then: fp32 runs keep the keys they had before the option
        settings["precision"] = "bf16"
    if dconfig["max_train_samples"] is not None:  # likewise: a model of the whole split keeps its key
        settings["max_train_samples"] = dconfig["max_train_samples"]
    payload = {"domain": name, "files": [_file_stamp(f) for f in files if os.path.isfile(f)],
               "encoder": encoder_identity(encoder_path), "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def training_autocast(dconfig):
    """The autocast dtype fine-tuning runs in on this config's device (None: fp32)."""
    from recbole_weaverec.model.twotower.encoder import autocast_dtype

    return autocast_dtype(dconfig["precision"] or "auto", torch.device(dconfig["device"]).type)


def default_cache_dir():
    from recbole_weaverec.hf.resolve import DEFAULT_CACHE_DIR

    return Path(DEFAULT_CACHE_DIR) / "mergerec"


def encoder_meta(model, domain):
    enc = model.tower.encoder
    vocab = model.tower.tokenizer.get_vocab()
    vocab_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {"domain": domain, "encoder": str(model.encoder_path), "model_type": enc.config.model_type,
            "vocab_size": str(enc.config.vocab_size), "hidden_size": str(enc.config.hidden_size),
            "num_layers": str(getattr(enc.config, "num_hidden_layers", "")), "tokenizer_vocab": vocab_hash}


COMPARED = ("model_type", "vocab_size", "hidden_size", "num_layers", "tokenizer_vocab")


def check_same_encoder(meta_a, meta_b):
    """Refuse two domain models of different encoders/vocabularies, naming both domains."""
    diff = [k for k in COMPARED if str(meta_a.get(k)) != str(meta_b.get(k))]
    if diff:
        a, b = meta_a.get("domain"), meta_b.get("domain")
        detail = ", ".join(f"{k} {meta_a.get(k)} vs {meta_b.get(k)}" for k in diff)
        raise DomainModelMismatchError(
            f"cannot merge domain {a!r} ({meta_a.get('encoder')}) with domain {b!r} ({meta_b.get('encoder')}): "
            f"different encoders or vocabularies ({detail}); all domain models must fine-tune one base encoder")


def save_domain_model(path, state, meta):
    from safetensors.torch import save_file

    with replacing(path) as tmp:  # an interrupted run never leaves half a model to be reused
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=meta)


def load_domain_model(path):
    """(state dict, meta) of a saved domain model; CacheFileError (one line) when it is unreadable or incomplete
    (truncated, overwritten, no encoder metadata, non-finite weights)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), "pt") as f:  # reads and checks the header only: a cut file fails here
            meta = dict(f.metadata() or {})
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CacheFileError(f"domain model {path} is unreadable ({type(e).__name__}: {e})") from None
    missing = [k for k in ("domain", *COMPARED) if k not in meta]
    if missing:
        raise CacheFileError(f"domain model {path} lacks the metadata {', '.join(missing)} (not written by MergeRec)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if not state or bad:
        raise CacheFileError(f"domain model {path} holds " + (f"non-finite values in {bad!r}" if bad else "no tensors"))
    return state, meta


def finetuned_path(config, dconfig, encoder_path):
    """Where domain ``dconfig['dataset']``'s model is read from / written to.

    ``merge_finetuned``: a folder (``<folder>/<domain>.safetensors``) or a mapping {domain: file}; otherwise the cache
    dir (``merge_cache_dir``, default ~/.cache/recbole_weaverec/mergerec) keyed by domain + settings.
    """
    name = dconfig["dataset"]
    given = config["merge_finetuned"]
    if isinstance(given, dict):
        if name in given:
            path = Path(os.path.expanduser(str(given[name])))
            if not path.is_file():
                raise FileNotFoundError(f"merge_finetuned[{name!r}] = {path}: file not found")
            return path, False
    elif given:
        return Path(os.path.expanduser(str(given))) / f"{name}.safetensors", True
    folder = Path(os.path.expanduser(str(config["merge_cache_dir"]))) if config["merge_cache_dir"] \
        else default_cache_dir()
    return folder / f"{name}-{cache_key(dconfig, encoder_path)}.safetensors", True


def finetune_domain(dconfig, show_progress=False, epoch_times=None):
    """Train a TextSeqRec on one domain's own training split with its trainer (warmup + decay, accumulation) and
    RecBole's early stopping: ``stopping_step`` evaluations without a better ``valid_metric`` end it, and the best
    validation checkpoint is the domain model.

    ``epoch_times`` (a list) receives the wall time of each training epoch (benchmarks compare it with merging).
    """
    import time

    from recbole.utils import init_seed

    from recbole_weaverec.model.twotower.textseqrec import TextSeqRec
    from recbole_weaverec.quick_start import get_trainer_class, prepare

    dataset, train, valid, _ = prepare(dconfig)
    init_seed(dconfig["seed"], dconfig["reproducibility"])
    model = TextSeqRec(dconfig, train._dataset).to(dconfig["device"])
    trainer = get_trainer_class(dconfig, TextSeqRec)(dconfig, model)
    if epoch_times is not None:
        train_epoch = trainer._train_epoch

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = train_epoch(*args, **kwargs)
            epoch_times.append(time.perf_counter() - start)
            return out

        trainer._train_epoch = timed
    try:
        trainer.fit(train, valid, saved=True, show_progress=show_progress)
        best = torch.load(trainer.saved_model_file, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict(best)
    finally:
        if os.path.isfile(trainer.saved_model_file):
            os.remove(trainer.saved_model_file)  # the domain model is kept as safetensors instead
    return model


def domain_models(config, tconfig, domains, show_progress=False):
    """{domain: (encoder state dict, meta)}: loaded when saved before, else fine-tuned on that domain only."""
    return dict(iter_domain_models(config, tconfig, domains, show_progress))


def iter_domain_models(config, tconfig, domains, show_progress=False):
    """(domain, (encoder state dict, meta)) one domain at a time. Every missing model is fine-tuned and saved first,
    one in memory at a time; then each is read again when its turn comes, so a caller that drops each state before
    the next holds one fine-tuned state, not all of them."""
    from recbole_weaverec.textembed import resolve_encoder_path

    encoder_path = resolve_encoder_path(tconfig["text_encoder_path"])
    paths = {name: _obtain(config, tconfig, name, encoder_path, show_progress) for name in domains}
    for name in domains:
        yield name, load_domain_model(paths[name])


def _obtain(config, tconfig, name, encoder_path, show_progress):
    """The path of one domain's good saved model: reused (checked by reading it) or fine-tuned and saved."""
    logger = getLogger()
    dconfig = domain_text_config(tconfig, name)
    path, writable = finetuned_path(config, dconfig, encoder_path)
    saved = _reuse(path, name, writable, config["merge_finetune"]) if path.is_file() else None
    if saved is not None:
        logger.info(f"MergeRec: domain {name}: reusing fine-tuned model {path}")
        return path
    if not config["merge_finetune"]:
        raise FileNotFoundError(f"no fine-tuned model for domain {name!r} at {path} and merge_finetune is False")
    logger.info(f"MergeRec: domain {name}: fine-tuning TextSeqRec on its own data")
    model = finetune_domain(dconfig, show_progress)
    # always writable here: only a file given in merge_finetuned is not, and it exists (read above or refused)
    save_domain_model(path, model.tower.encoder.state_dict(), encoder_meta(model, name))
    logger.info(f"MergeRec: domain {name}: saved to {path}")
    return path


def _reuse(path, name, writable, finetune):
    """A saved domain model, or None (warned: it is fine-tuned again and overwritten) when it is corrupt and this
    run may rebuild it; a corrupt file that must not be rebuilt is refused in one line."""
    try:
        return load_domain_model(path)
    except CacheFileError as e:
        if not writable:
            raise CacheFileError(f"{e}: it is merge_finetuned[{name!r}]; replace it with a good model, or remove that "
                                 f"entry to fine-tune the domain again") from None
        if not finetune:
            raise CacheFileError(f"{e}: merge_finetune is false, so it is not rebuilt; set merge_finetune: true "
                                 f"or replace the file") from None
        getLogger().warning(f"MergeRec: domain {name}: {e}: fine-tuning it again and overwriting it")
        return None
