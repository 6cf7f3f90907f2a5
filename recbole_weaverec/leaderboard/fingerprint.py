"""What a cell's result depends on beyond its own config dict: in its cache key (``grid.cell_hash``) the package's and
RecBole's versions and the contents of the dataset files the cell reads; beside it, the package's source files the
cell's process imported and the properties YAMLs its configs looked for (``loaded_code``, stored in the row, checked
by ``code_unchanged`` when the cell is looked up): editing a module or a default recomputes the cells that used it
(an EASE cell never imports the LLM code nor reads MergeRec.yaml, so editing those keeps it).

Contents are hashed (size and mtime alone miss an edit that keeps both), each file once per process and
(path, size, mtime): a board of many cells reads each file once, in chunks (atomic files can be tens of MB).
"""
import glob
import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# code that only presents or looks up finished cells (tables, charts, the cache, the command line): editing it must
# not invalidate the board, or `--render` after a change to the report would find no cached cell
PRESENTATION_ONLY = ("leaderboard/__init__.py", "leaderboard/__main__.py", "leaderboard/board.py",
                     "leaderboard/cli.py", "leaderboard/report.py", "leaderboard/significance.py",
                     # the search only chooses a cell's config (its study key hashes this code: tuning.study_name)
                     "leaderboard/tuning.py", "tune/__init__.py", "tune/__main__.py", "tune/cli.py",
                     "tune/space.py", "tune/study.py")
CHUNK = 1 << 20
_DIGESTS = {}  # (path, size, mtime_ns) -> sha256 of the file's contents, for this process


def _hash_contents(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path):
    """sha256 of the file's contents, computed once per (path, size, mtime) in this process; 'unreadable' for a
    file that cannot be read (the cell then fails with its own error, not the hashing)."""
    try:
        st = Path(path).stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = _hash_contents(path)
        return _DIGESTS[key]
    except OSError:
        return "unreadable"


def versions():
    """The package's and RecBole's versions (part of every cell's key)."""
    from importlib import metadata

    import recbole_weaverec

    try:
        recbole = metadata.version("recbole")
    except metadata.PackageNotFoundError:
        recbole = "unknown"
    return f"recbole_weaverec {recbole_weaverec.__version__}; recbole {recbole}"


def _result_code(path):
    rel = Path(path).resolve().relative_to(PACKAGE).as_posix()
    return rel.endswith(".py") and rel not in PRESENTATION_ONLY


def loaded_code():
    """{package file: sha256} of every source file of the package this process has imported that can change a
    cell's result, and of every properties YAML its configs looked for ('unreadable': absent); called at the end of
    a cell's own process, so it lists exactly what the run used."""
    import sys

    from recbole_weaverec.config import DEFAULTS_READ

    out = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and Path(path).resolve().is_relative_to(PACKAGE) and _result_code(path):
            out[Path(path).resolve().relative_to(PACKAGE).as_posix()] = file_digest(Path(path).resolve())
    for path in DEFAULTS_READ:  # a file looked for and absent is recorded as such: adding it recomputes the cell
        if Path(path).resolve().is_relative_to(PACKAGE):
            out[Path(path).resolve().relative_to(PACKAGE).as_posix()] = file_digest(path)
    return dict(sorted(out.items()))


def code_unchanged(code):
    """True when every file of ``loaded_code``'s record still has that content (a row without one: False)."""
    if not isinstance(code, dict) or not code:
        return False
    return all(isinstance(rel, str) and file_digest(PACKAGE / rel) == digest for rel, digest in code.items())


def data_digest(data_path, names):
    """{name: {file: sha256}} of the atomic files ``<data_path>/<name>/<name>.*`` (the domain's own YAML too) of each
    dataset; a missing folder hashes as {} (the cell fails later with its own error)."""
    out = {}
    for name in sorted(set(names)):
        folder = Path(data_path) / name
        files = sorted(p for p in folder.glob(f"{glob.escape(name)}.*") if p.is_file()) if folder.is_dir() else []
        out[name] = {p.name: file_digest(p) for p in files}
    return out
