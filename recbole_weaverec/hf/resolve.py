"""One resolver for every Hugging Face model the package loads: the embedded default, a local folder or a hub name.

What is resolved (the causal LM, the text encoder) only changes the error class, the wording of its three one-line
errors and where its embedded default lies; see ``hf.embedded`` for the two kinds.
"""
import os
from dataclasses import dataclass
from pathlib import Path

from recbole_weaverec.hf import hub

EMBEDDED_NAMES = (None, "", "embedded", "default")  # what a config says to mean the embedded default
DEFAULT_CACHE_DIR = Path(os.environ.get("RECBOLE_WEAVEREC_CACHE", Path.home() / ".cache" / "recbole_weaverec"))


@dataclass(frozen=True)
class Kind:
    """What is resolved: the error it raises and its messages, as ``str.format`` templates.

    ``no_config`` and ``not_found`` get ``{folder}`` (the expanded path); ``unavailable`` gets ``{name}`` (the hub
    name), ``{why}`` (``hub.unavailable_reason``) and, only where it names it, ``{embedded}`` (the embedded default's
    path: located only then, as the embedded LLM's folder is built on first use).
    """
    error: type
    no_config: str
    not_found: str
    unavailable: str


def looks_like_path(path):
    """Hub names are "name" or "org/name"; anything else (absolute, ./, ~, deeper) is meant as a folder."""
    return path.startswith(("/", ".", "~")) or os.sep != "/" and os.sep in path or path.count("/") > 1


def resolve_path(path, kind, embedded):
    """``embedded``/None -> ``str(embedded())``; a local HF folder -> its absolute path; else a hub name that can be
    had (in the local HF cache, or the hub answers). Anything else raises ``kind.error`` with a one-line message,
    in seconds where transformers would retry for ~50 s."""
    if path in EMBEDDED_NAMES:
        return str(embedded())
    path = str(path)
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise kind.error(kind.no_config.format(folder=expanded))
        return os.path.abspath(expanded)
    if looks_like_path(path) or os.path.exists(expanded):
        raise kind.error(kind.not_found.format(folder=expanded))
    why = hub.unavailable_reason(path)  # looked up at call time: tests may patch it
    if why:
        fields = {"name": path, "why": why}
        if "{embedded}" in kind.unavailable:
            fields["embedded"] = embedded()
        raise kind.error(kind.unavailable.format(**fields))
    return path
