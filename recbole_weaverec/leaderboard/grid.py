"""The grid: every cell of a board (protocol x model x dataset x source set x seed), its merged config and the hash
that is its cache key."""
import hashlib
import json

from recbole_weaverec.leaderboard.errors import _fail
from recbole_weaverec.leaderboard.fingerprint import data_digest, versions

NOT_HASHED = ("show_progress", "state")  # presentation only: toggling them keeps the cache


def cell_hash(cell):
    """Hash of everything that defines a cell's result (presentation-only settings excluded): the board's settings
    of the cell, the package's and RecBole's versions (``fingerprint``) and the contents of the dataset files it
    reads. The code and defaults a cell used are checked beside the key (``fingerprint.code_unchanged``)."""
    from recbole_weaverec.data.crossdomain import SAMPLE_SOURCES  # sources a cross-domain model takes unasked

    config = {k: v for k, v in cell["config"].items() if k not in NOT_HASHED}
    domains = [cell["dataset"], *cell["sources"], *SAMPLE_SOURCES.get(cell["dataset"], [])]
    key = {"model": cell["model"], "dataset": cell["dataset"], "sources": cell["sources"], "seed": cell["seed"],
           "protocol": cell["protocol"], "config": config, "versions": versions(),
           "data": data_digest(cell["config"]["data_path"], domains)}
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def expand_grid(cfg):
    """All cells: protocol x model entry x dataset x source set x seed, each with its merged config dict."""
    cells = []
    for protocol, pspec in cfg["protocols"].items():
        for m in cfg["models"]:
            if protocol not in m["protocols"]:
                continue
            for dataset in m["datasets"]:
                for key, sources, spec in _expand_sources(m, dataset, cfg):
                    for seed in m["seeds"]:
                        config = {**cfg["config"], **pspec["config"], **m["config"]}
                        # eval_args merged key by key, as WeaveConfig does for its layers
                        ea = {**cfg["config"].get("eval_args", {}), **pspec["config"].get("eval_args", {})}
                        if ea:
                            config["eval_args"] = ea
                        # sample_seed: the uniN candidates (runner); eval_sample_seed: the eval_sample_users
                        config.update({"data_path": cfg["data_path"], "seed": seed, "eval_mode": protocol,
                                       "sample_seed": cfg["sample_seed"], "eval_sample_seed": cfg["sample_seed"]})
                        if key:
                            config[key] = list(sources)
                        cell = {"protocol": protocol, "model": m["model"], "label": m["label"], "dataset": dataset,
                                "sources_key": key, "sources": list(sources), "sources_spec": spec,
                                "seed": seed, "config": config,
                                "available": m["available"]}
                        cell["hash"] = cell_hash(cell)
                        cells.append(cell)
    seen = {}
    for c in cells:
        other = seen.setdefault(c["hash"], c)
        if other is not c:
            _fail(f"models {other['label']!r} and {c['label']!r} are the same model with the same config; "
                  f"remove one or change its config")
    return cells


def _expand_sources(m, dataset, cfg):
    if m["sources"] is None:
        return [(None, [], None)]
    key, sets = m["sources"]
    out = []
    for s in sets:
        spec = s if s in ("others", "all") else None
        if s == "others":
            s = [d for d in cfg["datasets"] if d != dataset]
        elif s == "all":
            s = list(cfg["datasets"])
        if key == "source_domains":
            s = [d for d in s if d != dataset]  # a target is never its own source
        if s and all(s != o[1] for o in out):
            out.append((key, s, spec))
    return out


def sources_label(cell, short=False):
    """The cell's source domains, e.g. 'amazon-beauty+amazon-sports'; ``short``: 'others'/'all' as configured."""
    if not cell["sources"]:
        return "-"
    prefix = "merge " if cell["sources_key"] == "merge_domains" else ""
    if short and cell.get("sources_spec"):
        return f"{prefix}{cell['sources_spec']} ({len(cell['sources'])})"
    return prefix + "+".join(cell["sources"])
