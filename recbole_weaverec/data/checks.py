"""Checks of a dataset's atomic files before RecBole reads them: a broken file is named in one line.

RecBole (``Dataset._load_feat``) reads the header with ``open(encoding=config['encoding'])`` and the rows with
``pandas.read_csv(engine="python", delimiter=field_separator)``, whose rows come from Python's ``csv.reader``
(``strict=True``, quote char ``"``). What it does with a bad file is a traceback (empty file, ``name`` without
``:type``, unknown type, non-UTF-8 bytes, a non-numeric float), or worse, silence: a row with more fields than the
header is cut short, and when the first row has one, pandas takes the first column as the index and every column
shifts by one. ``check_dataset_files`` reads each file once, streaming, with the same csv dialect, encoding and
missing-value strings as RecBole, so what passes here is what RecBole reads as intended. Refused, with a
``DataFileError`` naming the file (and line): an empty file, a header-only ``.inter``, a header field that is not
``name:type`` or has an unknown type, a header without the user/item id fields the config names (or with them not
of type token), a duplicated header field, a row with more fields than the header, a value of a (loaded) float
column that is not a number nor empty, bytes that are not valid in the configured encoding.

Duplicates are warned about, not refused: both have a defined outcome in RecBole, and a repeated interaction can be
a real event (a re-purchase), so refusing would break datasets RecBole reads today.
* duplicate ids in ``.item``/``.user``: RecBole keeps the first row of each id (``drop_duplicates(keep="first")``);
  the warning names the count and the first duplicate, so a clash of two different rows is visible.
* exact duplicate ``.inter`` lines: RecBole keeps all of them; the warning names the count and the first pair of
  lines (``rm_dup_inter: first`` drops repeated user-item pairs).
Rows with fewer fields than the header are accepted (RecBole reads the missing values as missing), as are blank
lines (skipped by pandas). Cost: one streaming pass in C-speed pieces (csv.reader, hashes of whole lines), about
0.15 s CPU for amazon-sports (314K lines), ~6% of RecBole's create_dataset CPU time on it; ~27 MB peak for 1.1M lines.
"""
import codecs
import csv
import itertools
import logging
import os
import re
from array import array

import numpy as np

from recbole_weaverec.errors import DataFileError, MissingTextFieldError

try:  # the strings pandas reads as a missing value (NaN), so they are allowed in float columns
    from pandas._libs.parsers import STR_NA_VALUES as _NA
except ImportError:  # pragma: no cover - pandas moved it
    _NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
           "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
NA_VALUES = frozenset(_NA)
TYPES = ("token", "token_seq", "float", "float_seq")  # RecBole's FeatureType values
ID_OF = {"inter": ("USER_ID_FIELD", "ITEM_ID_FIELD"), "item": ("ITEM_ID_FIELD",), "user": ("USER_ID_FIELD",)}
NOUN = {"inter": "interactions", "item": "items", "user": "users"}


def check_dataset_files(config):
    """Check the atomic files RecBole will load for ``config`` (a RecBole Config); returns {file: rows}.

    Call it right before ``create_dataset(config)``. A dataset folder that does not exist is left to RecBole
    (which may download a known dataset).
    """
    folder = config["data_path"]  # RecBole's Config makes it data_path/dataset
    if not os.path.isdir(folder):
        return {}
    ids = {k: config[k] for k in ("USER_ID_FIELD", "ITEM_ID_FIELD")}
    return check_atomic_files(folder, config["dataset"], ids=ids, load_col=config["load_col"],
                              unload_col=config["unload_col"], field_separator=config["field_separator"] or "\t",
                              seq_separator=config["seq_separator"] or " ", encoding=config["encoding"],
                              benchmark_filename=config["benchmark_filename"])


def check_atomic_files(folder, dataset, ids=None, load_col=None, unload_col=None, field_separator="\t",
                       seq_separator=" ", encoding=None, benchmark_filename=None):
    """Check ``folder/dataset.inter`` (or its ``benchmark_filename`` parts), ``.item`` and ``.user`` if present.

    ``ids``: {"USER_ID_FIELD": ..., "ITEM_ID_FIELD": ...} (default user_id / item_id); ``load_col``/``unload_col``
    as in RecBole's config (only loaded float columns are parsed, as RecBole does). ``encoding`` None is what
    pandas then uses: utf-8. Raises DataFileError; returns {file: number of rows}.
    """
    ids = {"USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", **(ids or {})}
    encoding = encoding or "utf-8"
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataFileError(f"encoding={encoding!r} is not a known text encoding (RecBole reads the atomic files "
                            f"with it; default utf-8)") from None
    opts = dict(sep=field_separator, seq_sep=seq_separator, encoding=encoding)
    if benchmark_filename:
        inters = [os.path.join(folder, f"{dataset}.{part}.inter") for part in benchmark_filename]
        inters = [p for p in inters if os.path.isfile(p)]  # RecBole skips missing parts
        if not inters:
            raise DataFileError(f"no interaction file in {folder}: expected {dataset}.<part>.inter for "
                                f"benchmark_filename={list(benchmark_filename)!r}")
    else:
        inters = [os.path.join(folder, f"{dataset}.inter")]
        if not os.path.isfile(inters[0]):
            raise DataFileError(f"{inters[0]} not found: a RecBole dataset folder needs {dataset}.inter")
    rows = {}
    for kind, paths in (("inter", inters), ("item", [os.path.join(folder, f"{dataset}.item")]),
                        ("user", [os.path.join(folder, f"{dataset}.user")])):
        loaded = _loaded(kind, load_col, unload_col)
        for path in paths:
            if loaded is False or not os.path.isfile(path):  # RecBole does not read it either
                continue
            required = [ids[k] for k in ID_OF[kind] if ids.get(k)]
            rows[path] = check_file(path, kind, required, loaded, **opts)
    checked = [p for p in inters if p in rows]  # none when load_col leaves out inter (a config matter)
    if checked and not any(rows[p] for p in checked):
        raise DataFileError(f"{inters[0]} has a header but no interactions: expected one row per interaction "
                            f"after the header line")
    return rows


def check_text_fields(config):
    """The dataset's title field (or, with a fallback, one of the two) is in its .item header and loaded: a source
    domain that lacks it fails here, in seconds, not when it is loaded after the target's module has trained."""
    name = config["dataset"]
    wanted = [(k, config[k]) for k in ("title_field", "title_fallback_field") if k in config and config[k]]
    if not wanted:
        return
    item = os.path.join(config["data_path"], f"{name}.item")
    if not os.path.isfile(item):
        raise MissingTextFieldError(f"domain {name!r} has no item file {item}, so no {wanted[0][0]}={wanted[0][1]!r}")
    with open(item, encoding=config["encoding"] or "utf-8") as f:
        header = [c.split(":")[0] for c in f.readline().rstrip("\r\n").split(config["field_separator"] or "\t")]
    loaded = _loaded("item", config["load_col"], config["unload_col"])
    if not any(f in header and loaded is not False and _is_loaded(f, loaded) for _, f in wanted):
        key, field = wanted[0]
        where = f"its .item file has {header}" if field not in header else "load_col/unload_col leave it out"
        raise MissingTextFieldError(
            f"domain {name!r}: {key}={field!r} is not one of its item fields ({where}); set {key} for this domain "
            f"in {name}/{name}.yaml beside its files or in domain_settings: {{{name}: {{{key}: ...}}}}")


def _loaded(kind, load_col, unload_col):
    """The fields RecBole loads from a file of ``kind``: None = all, False = the file is not read, else a set."""
    if load_col is None:
        loaded = None
    elif kind not in load_col:
        return False
    else:
        loaded = None if load_col[kind] == "*" else set(load_col[kind])
    if unload_col and kind in unload_col:
        loaded = ("all-but", set(unload_col[kind]))
    return loaded


def _is_loaded(field, loaded):
    if loaded is None:
        return True
    if isinstance(loaded, tuple):
        return field not in loaded[1]
    return field in loaded


def _short(value, n=40):
    return repr(value if len(value) <= n else value[:n] + "...")


def parse_header(path, line, sep, kind, required):
    """[(field, type)] of a header line, or DataFileError naming what is wrong with it."""
    where = f"{path}, line 1 (header)"
    if line.startswith("\ufeff"):
        raise DataFileError(f"{where} starts with a byte-order mark, which RecBole reads as part of the first field "
                            f"name: save the file without BOM (or set encoding: utf-8-sig)")
    fields = line.split(sep)
    other = next((o for o in ("\t", ",", ";", "|", " ") if o != sep and o in line), None) \
        if len(fields) == 1 else None  # a file written with another separator reads as one long field
    parsed, seen = [], set()
    for text in fields:
        name, colon, ftype = text.partition(":")
        if (not colon or not name or ftype not in TYPES) and other:
            raise DataFileError(f"{where} has no field_separator {sep!r} but contains {other!r}: separate the "
                                f"fields by {sep!r} (or set field_separator)")
        if not colon:
            raise DataFileError(f"{where}: field {_short(text)} has no type: expected name:type with type one of "
                                f"{', '.join(TYPES)} (e.g. {required[0] if required else 'item_id'}:token)")
        if not name or ftype not in TYPES:
            what = "has no name" if not name else f"has unknown type {_short(ftype)}"
            raise DataFileError(f"{where}: field {_short(text)} {what}; allowed types: {', '.join(TYPES)}")
        if name in seen:
            raise DataFileError(f"{where}: field {name!r} appears twice")
        seen.add(name)
        parsed.append((name, ftype))
    types = dict(parsed)
    for name in required:
        if name not in types:
            raise DataFileError(f"{where} has no field {name!r} (the config's id field; the header has "
                                f"{', '.join(n for n, _ in parsed)}): a .{kind} file needs {name}:token")
        if types[name] != "token":
            raise DataFileError(f"{where}: id field {name!r} has type {types[name]}: RecBole ids must be "
                                f"{name}:token")
    return parsed


def _chunks(f, line_hashes):
    """The file's lines, a chunk at a time; with ``line_hashes`` (a list) each chunk's line hashes are kept too
    (duplicate lines are counted from these, at C speed)."""
    while True:
        lines = f.readlines(1 << 20)
        if not lines:
            return
        if line_hashes is not None:
            line_hashes.append(np.fromiter(map(hash, lines), dtype=np.int64, count=len(lines)))
        yield lines


def _rows(f, sep, line_hashes=None):
    """(rows, line number function): rows as pandas' python engine splits them, csv.reader for a one-character
    separator, else a regex on the stripped line."""
    lines = itertools.chain.from_iterable(_chunks(f, line_hashes))
    if len(sep) == 1:
        reader = csv.reader(lines, delimiter=sep, quotechar='"', doublequote=True, strict=True)
        return reader, lambda: reader.line_num + 1
    pattern = re.compile(sep)
    state = [1]

    def split():
        for state[0], text in enumerate(lines, 2):
            yield pattern.split(text.strip())
    return split(), lambda: state[0]


def check_file(path, kind, required, loaded=None, sep="\t", seq_sep=" ", encoding="utf-8"):
    """Check one atomic file (``kind``: inter, item or user) -> number of rows; see the module docstring."""
    try:
        return _check_file(path, kind, required, loaded, sep, seq_sep, encoding)
    except UnicodeDecodeError as e:
        raise DataFileError(_decode_error(path, encoding, e)) from None
    except OSError as e:
        raise DataFileError(f"{path} cannot be read: {e.strerror or e}") from None


def _check_file(path, kind, required, loaded, sep, seq_sep, encoding):
    with open(path, encoding=encoding, newline="") as f:
        first = f.readline()
        if not first.strip():
            example = sep.join(f"{n}:token" for n in required) or "item_id:token"
            raise DataFileError(f"{path} is empty: expected a header line such as {example!r} and then rows"
                                if not first or not f.read().strip() else
                                f"{path}, line 1 is blank: RecBole reads the first line as the header "
                                f"(such as {example!r})")
        header = parse_header(path, first.rstrip("\r\n"), sep, kind, required)
        n_fields = len(header)
        floats = [i for i, (name, t) in enumerate(header) if t == "float" and _is_loaded(name, loaded)]
        float_seqs = [i for i, (name, t) in enumerate(header) if t == "float_seq" and _is_loaded(name, loaded)]
        # duplicates: whole lines of .inter; the id of .item / .user (what RecBole deduplicates on)
        id_index = next((i for i, (name, _) in enumerate(header) if required and name == required[0]), 0)
        line_hashes = [] if kind == "inter" else None
        id_hashes = array("q")
        add_id = id_hashes.append
        reader, line_no = _rows(f, sep, line_hashes)
        pad = [""] * n_fields
        rows = 0
        try:
            for row in reader:
                k = len(row)
                if k != n_fields:
                    if k > n_fields:
                        raise DataFileError(
                            f"{path}, line {line_no()}: {k} fields but the header has {n_fields} (field_separator "
                            f"{sep!r}; a separator at the end of the line or inside a value?)")
                    if k == 0 or k == 1 and not row[0].strip():
                        continue  # a blank line: pandas skips it
                    row = row + pad[k:]  # missing trailing values: RecBole reads them as missing
                rows += 1
                for i in floats:
                    value = row[i]
                    try:
                        float(value)
                    except ValueError:
                        if value not in NA_VALUES:
                            raise _bad_float(path, line_no(), header[i], value) from None
                for i in float_seqs:
                    value = row[i]
                    if value not in NA_VALUES:
                        for part in value.split(seq_sep):
                            try:
                                part and float(part)
                            except ValueError:
                                raise _bad_float(path, line_no(), header[i], part, seq_sep) from None
                if line_hashes is None:
                    add_id(hash(row[id_index]))
        except csv.Error as e:
            raise DataFileError(f"{path}, line {_record_start(path, sep, encoding)}: cannot be split into fields "
                                f"({e}); a value that starts with '\"' must end with '\"'") from None
    if not rows and kind != "inter":  # .inter: refused by the caller when no part has a row
        if not first.endswith(("\n", "\r")):
            raise DataFileError(f"{path} holds only a header without a line break, which RecBole misreads "
                                f"(it cuts the header's last character): end the header line with a newline")
        logging.getLogger().warning(f"{path} has a header but no {NOUN[kind]}")
    if line_hashes is not None:
        hashes = np.concatenate(line_hashes) if line_hashes else np.empty(0, np.int64)
        hashes = hashes[~np.isin(hashes, _BLANK_HASHES)]  # blank lines are skipped, not duplicates
    else:
        hashes = np.frombuffer(id_hashes, dtype=np.int64)
    _warn_duplicates(path, kind, hashes, header[id_index][0], sep, encoding, id_index)
    return rows


_BLANK_HASHES = np.array([hash(b) for b in ("\n", "\r\n", "\r", "")], dtype=np.int64)


def _record_start(path, sep, encoding):
    """The line where the record that csv.reader refuses begins (an unclosed quote fails only at the file's end)."""
    with open(path, encoding=encoding, newline="") as f:
        f.readline()
        reader, line_no = _rows(f, sep)
        start = 2
        try:
            for _ in reader:
                start = line_no() + 1
        except csv.Error:
            pass
    return start


def _bad_float(path, line, field, value, seq_sep=None):
    name, ftype = field
    inside = f" (one value of the {seq_sep!r}-separated sequence)" if seq_sep is not None else ""
    return DataFileError(f"{path}, line {line}: field {name!r} ({ftype}) has value {_short(value)}{inside}: "
                         f"expected a number, or nothing for a missing value")


def _decode_error(path, encoding, error):
    """One line naming the first line whose bytes are not valid in ``encoding`` (read again, only on this path)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                return (f"{path}, line {line_no}: byte {raw[e.start:e.start + 1]!r} at column {e.start + 1} is not "
                        f"valid {encoding} (RecBole reads atomic files as {encoding}: re-save the file as UTF-8 or "
                        f"set encoding to the file's encoding)")
    return f"{path} is not valid {encoding} text ({error.reason}); re-save it as UTF-8 or set encoding"


def _warn_duplicates(path, kind, hashes, id_field, sep, encoding, id_index):
    """Warn with the count and the first duplicate (found by a second pass, only when there is one)."""
    hashes = np.sort(hashes)  # not np.unique: its hash table is ~100x slower on int64 (numpy 2.x)
    count = int((hashes[1:] == hashes[:-1]).sum())
    if not count:
        return
    first = _first_duplicate(path, kind, sep, encoding, id_index)
    if kind == "inter":
        msg = (f"{path}: {count} exact duplicate interaction line(s)" +
               (f", first at line {first[1]}, a copy of line {first[0]}" if first else "") +
               "; RecBole keeps them all (rm_dup_inter: first drops repeated user-item pairs)")
    else:
        msg = (f"{path}: {count} duplicate {id_field}(s)" +
               (f", first {first[2]!r} at line {first[1]} (also line {first[0]})" if first else "") +
               "; RecBole keeps the first row of each id")
    logging.getLogger().warning(msg)


def _first_duplicate(path, kind, sep, encoding, id_index):
    """(line of the original, line of the copy, key) of the first repeated line (.inter) or id, or None."""
    seen = {}
    with open(path, encoding=encoding, newline="") as f:
        f.readline()
        if kind == "inter":
            keyed = ((n, line.rstrip("\r\n")) for n, line in enumerate(f, 2) if line.strip())
        else:
            reader, line_no = _rows(f, sep)
            keyed = ((line_no(), row[id_index]) for row in reader
                     if len(row) > id_index and (len(row) > 1 or row[0].strip()))
        for n, key in keyed:
            if key in seen:
                return seen[key], n, key
            seen[key] = n
    return None
