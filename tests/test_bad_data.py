"""Broken atomic data files are named in one line (file and line) before RecBole reads them (issue 12, item 6)."""
import logging
import subprocess
import sys

import pytest

from recbole_weaverec.data.checks import check_atomic_files, check_dataset_files
from recbole_weaverec.errors import ConfigError, DataFileError

from conftest import REPO, SAMPLE_DATA, SHARED_DATA, write_tiny_dataset

INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float"


@pytest.fixture
def tiny(tmp_path):
    """(root, folder) of a valid tiny dataset "tiny" whose files a test then breaks."""
    root = write_tiny_dataset(tmp_path / "data")
    return root, root / "tiny"


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def write(path, rows, end="\n"):
    path.write_text("\n".join(rows) + end, encoding="utf-8")


def replace_line(path, number, text):
    rows = lines(path)
    rows[number - 1] = text
    write(path, rows)


def refused(folder, file, line=None, *words, **kw):
    """The check's error: a DataFileError (so the CLI prints one line), naming the file, the line and ``words``."""
    with pytest.raises(DataFileError) as e:
        check_atomic_files(folder, "tiny", **kw)
    msg = str(e.value)
    assert isinstance(e.value, ConfigError)
    assert "\n" not in msg and "Traceback" not in msg
    assert str(folder / file) in msg, msg
    if line is not None:
        assert f"line {line}" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_valid_tiny_dataset_passes(tiny):
    root, folder = tiny
    rows = check_atomic_files(folder, "tiny")
    assert rows[str(folder / "tiny.inter")] == len(lines(folder / "tiny.inter")) - 1
    assert rows[str(folder / "tiny.item")] == 25


# ----------------------------------------------------------------------------------------------- refused
def test_empty_inter(tiny):
    _, folder = tiny
    (folder / "tiny.inter").write_text("", encoding="utf-8")
    refused(folder, "tiny.inter", None, "is empty", "user_id:token")


def test_header_only_inter(tiny):
    _, folder = tiny
    write(folder / "tiny.inter", [INTER_HEADER])
    refused(folder, "tiny.inter", None, "no interactions")


def test_blank_first_line(tiny):
    _, folder = tiny
    write(folder / "tiny.inter", ["", *lines(folder / "tiny.inter")])
    refused(folder, "tiny.inter", 1, "blank", "header")


def test_header_field_without_type(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.inter", 1, "user_id\titem_id:token\ttimestamp:float")
    refused(folder, "tiny.inter", 1, "'user_id'", "no type", "token_seq")


def test_unknown_type(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.item", 1, "item_id:token\ttitle:text\tbrand:token\tcategories:token_seq")
    refused(folder, "tiny.item", 1, "unknown type 'text'", "float_seq")


def test_header_without_the_configured_id_field(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.inter", 1, "uid:token\titem_id:token\ttimestamp:float")
    refused(folder, "tiny.inter", 1, "'user_id'", "uid")
    # the id names come from the config: with USER_ID_FIELD=uid the same file passes
    check_atomic_files(folder, "tiny", ids={"USER_ID_FIELD": "uid"})


def test_item_file_without_item_id(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.item", 1, "asin:token\ttitle:token_seq\tbrand:token\tcategories:token_seq")
    refused(folder, "tiny.item", 1, "'item_id'")


def test_id_field_that_is_not_a_token(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.inter", 1, "user_id:token\titem_id:float\ttimestamp:float")
    refused(folder, "tiny.inter", 1, "'item_id'", "float", "item_id:token")


def test_duplicated_header_field(tiny):
    _, folder = tiny
    replace_line(folder / "tiny.inter", 1, "user_id:token\titem_id:token\titem_id:token")
    refused(folder, "tiny.inter", 1, "twice")


def test_other_separator_is_named(tiny):
    _, folder = tiny
    write(folder / "tiny.inter", [r.replace("\t", ",") for r in lines(folder / "tiny.inter")])
    refused(folder, "tiny.inter", 1, "','", "field_separator")


def test_byte_order_mark(tiny):
    _, folder = tiny
    path = folder / "tiny.inter"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    refused(folder, "tiny.inter", 1, "byte-order mark")


def test_non_numeric_float(tiny):
    _, folder = tiny
    row = lines(folder / "tiny.inter")[4].split("\t")
    replace_line(folder / "tiny.inter", 5, "\t".join([row[0], row[1], "yesterday"]))
    refused(folder, "tiny.inter", 5, "'timestamp'", "'yesterday'", "number")


def test_non_numeric_float_seq(tiny):
    _, folder = tiny
    write(folder / "tiny.user", ["user_id:token\tweights:float_seq", "u0\t0.5 1.5", "u1\t0.5 x1 2"])
    refused(folder, "tiny.user", 3, "'weights'", "'x1'")


def test_non_utf8_bytes(tiny):
    _, folder = tiny
    path = folder / "tiny.item"
    rows = path.read_bytes().split(b"\n")
    rows[6] = rows[6].replace(b"Widget", b"Widg\xe9t")  # latin-1 é
    path.write_bytes(b"\n".join(rows))
    refused(folder, "tiny.item", 7, "utf-8", "\\xe9")


def test_more_fields_than_the_header(tiny):
    _, folder = tiny
    path = folder / "tiny.inter"
    replace_line(path, 3, lines(path)[2] + "\textra")
    refused(folder, "tiny.inter", 3, "4 fields", "header has 3")


def test_separator_at_the_end_of_the_first_row(tiny):
    # pandas would take the first column as the index and shift every column by one, silently
    _, folder = tiny
    path = folder / "tiny.inter"
    replace_line(path, 2, lines(path)[1] + "\t")
    refused(folder, "tiny.inter", 2, "4 fields")


def test_unclosed_quote_names_the_line_it_starts(tiny):
    _, folder = tiny
    path = folder / "tiny.item"
    replace_line(path, 4, 'i2\t"Widget number 2\tBrand2\tToys')
    refused(folder, "tiny.item", 4, "'\"'")


def test_broken_user_file_is_checked_too(tiny):
    _, folder = tiny
    write(folder / "tiny.user", ["user_id:token\tage:float", "u0\t31", "u1\tthirty"])
    refused(folder, "tiny.user", 3, "'thirty'")


def test_unknown_encoding(tiny):
    _, folder = tiny
    with pytest.raises(DataFileError, match="encoding='utf9'"):
        check_atomic_files(folder, "tiny", encoding="utf9")


def test_missing_inter_file(tiny):
    _, folder = tiny
    (folder / "tiny.inter").unlink()
    refused(folder, "tiny.inter", None, "not found")


# ----------------------------------------------------------------------------------- accepted, as RecBole does
def test_what_recbole_reads_fine_is_accepted(tiny):
    _, folder = tiny
    path = folder / "tiny.inter"
    rows = lines(path)
    u, i, _ = rows[1].split("\t")
    rows[1] = f"{u}\t{i}\t"  # an empty float: missing (RecBole fills it)
    rows[2] = "\t".join(rows[2].split("\t")[:2] + ["NaN"])
    rows[3] = "\t".join(rows[3].split("\t")[:2])  # a short row: missing timestamp
    rows.insert(5, "")  # blank lines are skipped
    write(path, rows)
    check_atomic_files(folder, "tiny")


def test_unloaded_float_column_is_not_parsed(tiny):
    # RecBole reads only load_col's columns; a junk value in another column does not hurt it
    _, folder = tiny
    path = folder / "tiny.inter"
    write(path, [INTER_HEADER + "\trating:float"] + [r + "\tn/a?" for r in lines(path)[1:]])
    load_col = {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id", "title"]}
    check_atomic_files(folder, "tiny", load_col=load_col)
    refused(folder, "tiny.inter", 2, "'rating'")


def test_header_only_item_file_is_a_warning(tiny, caplog):
    _, folder = tiny
    write(folder / "tiny.item", ["item_id:token\ttitle:token_seq"])
    with caplog.at_level(logging.WARNING):
        check_atomic_files(folder, "tiny")
    assert "no items" in caplog.text and "tiny.item" in caplog.text


# ------------------------------------------------------------------------------------- duplicates: warned about
def test_duplicate_item_ids_are_warned_with_count_and_lines(tiny, caplog):
    _, folder = tiny
    path = folder / "tiny.item"
    rows = lines(path)
    write(path, rows + [rows[3].replace("deluxe", "basic"), rows[5]])  # ids i2 and i4 again
    with caplog.at_level(logging.WARNING):
        check_atomic_files(folder, "tiny")
    msg = next(r.getMessage() for r in caplog.records if "duplicate" in r.getMessage())
    assert "2 duplicate item_id" in msg and "'i2'" in msg and "line 27" in msg and "line 4" in msg
    assert "keeps the first" in msg and "\n" not in msg


def test_duplicate_interactions_are_warned_with_count_and_lines(tiny, caplog):
    _, folder = tiny
    path = folder / "tiny.inter"
    rows = lines(path)
    write(path, rows[:3] + [rows[2]] + rows[3:] + ["", ""])  # line 4 copies line 3; blank lines do not count
    with caplog.at_level(logging.WARNING):
        check_atomic_files(folder, "tiny")
    msg = next(r.getMessage() for r in caplog.records if "duplicate" in r.getMessage())
    assert "1 exact duplicate interaction" in msg and "line 4" in msg and "line 3" in msg
    assert "rm_dup_inter" in msg


def test_no_warning_on_clean_data(tiny, caplog):
    _, folder = tiny
    with caplog.at_level(logging.WARNING):
        check_atomic_files(folder, "tiny")
    assert not caplog.records


# ------------------------------------------------------------------------------------------------- real data
@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLE_DATA.iterdir() if (p / f"{p.name}.inter").is_file())
                         if SAMPLE_DATA.is_dir() else [])
def test_sample_data_passes(name, caplog):
    with caplog.at_level(logging.WARNING):
        rows = check_atomic_files(SAMPLE_DATA / name, name)
    assert rows[str(SAMPLE_DATA / name / f"{name}.inter")] > 0 and not caplog.records


def test_shared_domains_pass():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real domains not found at {SHARED_DATA}")
    names = sorted(p.name for p in SHARED_DATA.iterdir() if (p / f"{p.name}.inter").is_file())
    assert names
    for name in names:
        assert check_atomic_files(SHARED_DATA / name, name)[str(SHARED_DATA / name / f"{name}.inter")] > 0


def test_check_from_a_config_uses_its_fields(tiny):
    from recbole_weaverec.quick_start import build_config

    root, folder = tiny
    config = build_config("EASE", "tiny", config_dict={"data_path": str(root), "state": "WARNING"})
    assert check_dataset_files(config)[str(folder / "tiny.inter")] > 0
    replace_line(folder / "tiny.inter", 1, "user_id:token\titem_id:token\ttimestamp:date")
    with pytest.raises(DataFileError, match="unknown type 'date'"):
        check_dataset_files(config)


def _prepare_checks():
    from recbole_weaverec import quick_start

    import inspect

    return "check_dataset_files" in inspect.getsource(quick_start)


@pytest.mark.skipif(not _prepare_checks(), reason="quick_start.prepare does not call check_dataset_files yet")
def test_cli_one_line_and_exit_2(tiny, tmp_path):
    root, folder = tiny
    replace_line(folder / "tiny.inter", 6, "u0\ti1\tnoon")
    proc = subprocess.run([sys.executable, str(REPO / "run_recbole_weaverec.py"), "--model=EASE", "--dataset=tiny",
                           f"--data_path={root}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "tiny.inter, line 6" in err[-1] and "'noon'" in err[-1]
    assert "Traceback" not in proc.stderr


def test_broken_source_domain_refused_before_training(tmp_path):
    """WeaveRec/LLMJoint/LLMMerge load source domains between modules: their files are checked at model build."""
    from conftest import write_tiny_dataset
    from recbole_weaverec.data.crossdomain import check_domain_files
    from recbole_weaverec.quick_start import build_config

    data = write_tiny_dataset(tmp_path / "d", "tiny")
    write_tiny_dataset(data, "src", seed=1)
    (data / "src" / "src.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\tnoon\n")
    config = build_config("LLMJoint", "tiny", config_dict={"data_path": str(data), "source_domains": ["src"]})
    with pytest.raises(DataFileError, match="src.inter, line 2"):
        check_domain_files(config, ["src"])
