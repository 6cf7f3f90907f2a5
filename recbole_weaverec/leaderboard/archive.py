"""A board's committed results: ``OUTPUT_DIR/cells/<hash>.json.gz`` (every finished cell the tables show, per-user
values included) and ``OUTPUT_DIR/tuned/<study>.json`` (the search records behind its tuned rows). The cache
(``OUTPUT_DIR/cache``, not committed) is one machine's; the archive travels with the repository, so a board whose
cells were computed on several machines renders and resumes on any of them. It is only ever read as plain JSON, and
an archived cell is used only while the code and defaults it ran are unchanged (the cache's own rule)."""
import gzip
import io
import json
import sys
from pathlib import Path

from recbole_weaverec.files import replacing, write_text


def _gzip_bytes(text):
    """Deterministic gzip (no file name, mtime 0): the same row gives the same bytes, so git sees no change."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as f:
        f.write(text.encode("utf-8"))
    return buffer.getvalue()


class Archive:
    def __init__(self, root):
        self.root = Path(root)
        self.cells = self.root / "cells"
        self.tuned = self.root / "tuned"
        self._warned = set()

    def cell_path(self, cell_hash):
        return self.cells / f"{cell_hash}.json.gz"

    def record_path(self, study):
        return self.tuned / f"{study}.json"

    def get(self, cell_hash):
        """The archived row of this cell, or None (absent, or unreadable: said once, in one line)."""
        path = self.cell_path(cell_hash)
        if not path.is_file():
            return None
        try:
            row = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
            if isinstance(row, dict):
                return row
            problem = "not a result row"
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if path not in self._warned:
            self._warned.add(path)
            print(f"warning: archived cell {path} is unreadable ({problem}); it is computed again", file=sys.stderr)
        return None

    def record(self, study):
        path = self.record_path(study)
        return path if path.is_file() else None

    def write(self, rows, records):
        """Add or update ``rows`` ({hash: row}, finished cells) and ``records`` ({study: record}); each file is
        written whole or not at all, and one that already holds the same row is left untouched. Nothing is removed:
        a render on a machine without the data (every cell pending there) must not wipe the committed results, and
        a cell whose code has changed since is simply not used (and replaced once it is computed again)."""
        for cell_hash, row in rows.items():
            path = self.cell_path(cell_hash)
            if not path.is_file() or self.get(cell_hash) != row:
                with replacing(path) as tmp:
                    tmp.write_bytes(_gzip_bytes(json.dumps(row, sort_keys=True, separators=(",", ":"))))
        for study, record in records.items():
            text = json.dumps(record, indent=1, sort_keys=True)
            path = self.record_path(study)
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                write_text(path, text)
