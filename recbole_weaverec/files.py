"""Files that appear whole or not at all: a cache entry, an adapter folder, a table or a journal is written under a
temporary name next to its place and renamed into it, so a reader (a concurrent run, the next run after Ctrl-C,
SIGTERM or a full disk) never sees half of one. Imports nothing from the package, so every room can use it."""
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _ordinary(path, folder):
    """mkstemp/mkdtemp make owner-only entries; give the finished one the permissions a plain open() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


@contextmanager
def replacing(path, folder=False):
    """Yields a new temporary sibling of ``path`` (an empty folder with ``folder``, else a path to write a file to).
    When the block ends without an error it takes ``path``'s place in one rename (an existing folder there is
    removed first), with ordinary permissions; otherwise it is removed and ``path`` is left as it was."""
    path = Path(path)
    for attempt in range(5):  # another process may remove an emptied parent between mkdir and mkstemp: make it again
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            if folder:
                tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
            else:
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                tmp = Path(name)
            break
        except FileNotFoundError:
            if attempt == 4:
                raise
    try:
        yield tmp
        _ordinary(tmp, folder)
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def write_text(path, text):
    """``path`` holds ``text`` (UTF-8), written atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
