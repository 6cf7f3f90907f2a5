"""What a run writes, and how a stopped run leaves nothing half-written.

A run's own files (RecBole's log file ``log/<MODEL>/<name>.log``, its TensorBoard folder ``log_tensorboard/<name>/``,
the checkpoint ``saved/<MODEL>-<time>.pth`` and any outputs a model registers in ``config['_run_outputs']``) are
listed in a journal ``log/.unfinished/<pid>.json`` while the run is going. A run that ends with a result deletes
its journal; one that fails, is interrupted (Ctrl-C) or terminated (SIGTERM: ``timeout``, Slurm, ``docker stop``)
deletes the files and the journal. A run killed outright (SIGKILL, power loss) cannot clean up: the next run in the
same folder finds its journal, sees that the process is gone, and removes the dead run's files.
"""
import json
import logging
import os
import shutil
import signal
import threading
from contextlib import contextmanager

from recbole_weaverec.files import write_text

JOURNAL_DIR = os.path.join("log", ".unfinished")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM so that cleanup runs as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated(128 + signum)


@contextmanager
def sigterm_as_exit():
    """SIGTERM raises ``Terminated`` (exit code 143) while inside, where the default would kill the process with no
    cleanup. Only in the main thread and only if nobody installed a handler of their own."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.remove(path)
        except OSError:
            pass
    parent = os.path.dirname(path)
    # an empty log/<MODEL>/ folder says nothing: remove it too (never a non-empty one)
    if parent and os.path.basename(os.path.dirname(parent)) == "log" and os.path.isdir(parent):
        try:
            os.rmdir(parent)
        except OSError:
            pass


class RunFiles:
    """The journal of one run: ``add`` paths as they become known, then ``finished()`` or ``discard()``."""

    def __init__(self):
        self.paths = []
        self.journal = os.path.join(JOURNAL_DIR, f"{os.getpid()}.json")
        recover_dead_runs()

    def add(self, *paths):
        for path in paths:
            if path and os.path.abspath(path) not in self.paths:
                self.paths.append(os.path.abspath(path))
        self._write()

    def add_log_file(self, log_file):
        """RecBole names the TensorBoard folder after the log file (``log_tensorboard/<log name>/``)."""
        name = os.path.basename(log_file).split(".")[0]
        self.add(log_file, os.path.join("log_tensorboard", name))

    def _write(self):
        write_text(self.journal, json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "paths": self.paths}))

    def finished(self):
        self.paths = []
        _remove(self.journal)
        _remove_if_empty(JOURNAL_DIR)

    def discard(self, extra=()):
        for path in [*self.paths, *(os.path.abspath(p) for p in extra)]:
            _remove(path)
        self.finished()


class JournaledList(list):
    """``config['_run_outputs']``: a model's ``append(path)`` also records the path in the run's journal."""

    def __init__(self, files, items=()):
        super().__init__(items)
        self._files = files
        files.add(*items)

    def append(self, path):
        super().append(path)
        self._files.add(path)

    def extend(self, paths):
        for path in paths:
            self.append(path)


def _remove_if_empty(folder):
    try:
        os.rmdir(folder)
    except OSError:
        pass


def recover_dead_runs():
    """Remove the files of runs in this folder whose process no longer exists (killed without cleanup)."""
    if not os.path.isdir(JOURNAL_DIR):
        return []
    removed = []
    for name in sorted(os.listdir(JOURNAL_DIR)):
        path = os.path.join(JOURNAL_DIR, name)
        if not name.endswith(".json"):
            if name.endswith(".tmp") and not _alive(_pid_of(name)):
                _remove(path)
            continue
        try:
            with open(path, encoding="utf-8") as f:
                entry = json.load(f)
            pid, paths = int(entry["pid"]), [str(p) for p in entry["paths"]]
        except (OSError, ValueError, KeyError, TypeError):
            logging.getLogger().warning(f"removing unreadable run journal {path}")
            _remove(path)
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        here = os.path.abspath(os.getcwd())
        # a journal is only trusted with files inside this folder (a planted one must not delete anything else)
        paths = [p for p in paths if os.path.abspath(p).startswith(here + os.sep)]
        for p in paths:
            _remove(p)
        _remove(path)
        removed.extend(paths)
        if paths:
            logging.getLogger().warning(
                f"removed the files of an unfinished run (process {pid} was killed): {', '.join(paths)}")
    _remove_if_empty(JOURNAL_DIR)
    return removed


def _pid_of(name):
    try:
        return int(name.split(".")[0])
    except ValueError:
        return -1
