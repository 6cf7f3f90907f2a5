"""Atomic file writes: a cache entry or a table appears whole, with ordinary permissions, or not at all."""
import os
import tempfile
from pathlib import Path


def _atomic_write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    _publish(tmp, path)


def _publish(tmp, path):
    """Move a finished temporary file into place with ordinary permissions (mkstemp makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
