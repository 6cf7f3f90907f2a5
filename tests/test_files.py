"""recbole_weaverec.files: a file or folder appears whole, with ordinary permissions, or not at all."""
import os

import pytest

from recbole_weaverec.files import replacing, write_text


def test_a_file_is_replaced_whole_or_left_as_it_was(tmp_path):
    path = tmp_path / "sub" / "cell.json"
    write_text(path, "old")
    assert path.read_text() == "old"
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt  # Ctrl-C while writing
    assert path.read_text() == "old" and os.listdir(path.parent) == ["cell.json"]  # no temporary left
    write_text(path, "new")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and (path.stat().st_mode & 0o777) == 0o666 & ~umask


def test_a_folder_replaces_the_old_one_in_one_rename(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "stale.bin").write_text("x")
    with pytest.raises(OSError):
        with replacing(folder, folder=True) as tmp:
            (tmp / "adapter_config.json").write_text("{}")
            raise OSError("disk full")
    assert sorted(os.listdir(folder)) == ["stale.bin"] and os.listdir(tmp_path) == ["adapter"]
    with replacing(folder, folder=True) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert sorted(os.listdir(folder)) == ["adapter_config.json"] and os.listdir(tmp_path) == ["adapter"]
