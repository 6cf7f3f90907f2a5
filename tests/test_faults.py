"""Faults leave nothing half-written (issue 12): SIGTERM cleans up as Ctrl-C does, a SIGKILLed run's files are
removed by the next run in the same folder, failed runs leave no empty log/TensorBoard folders."""
import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from recbole_weaverec.quick_start import run

from conftest import REPO


def _outputs(folder):
    found = []
    for pattern in ("log/**/*.log", "log_tensorboard/*", "saved/*.pth", "log/*"):
        found += glob.glob(os.path.join(folder, pattern), recursive=True)
    return sorted(p for p in found if not p.endswith(".unfinished"))


def _start_slow_run(tiny_data, folder):
    cmd = [sys.executable, str(REPO / "run_recbole_weaverec.py"), "--model=SASRec", "--dataset=tiny",
           f"--data_path={tiny_data}", "--epochs=500", "--eval_step=1", "--stopping_step=1000",
           "--show_progress=False"]
    # the child gets Ctrl-C as from a terminal even when these tests run in a background job, whose shell starts
    # every command with SIGINT ignored (Python then never installs its KeyboardInterrupt handler)
    proc = subprocess.Popen(cmd + ["--state=ERROR"], cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(os.path.join(folder, "saved", "*.pth")):
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.stderr.read()}")
        time.sleep(0.2)
    assert glob.glob(os.path.join(folder, "saved", "*.pth")), "no checkpoint written within 120 s"
    assert glob.glob(os.path.join(folder, "log_tensorboard", "*")) and glob.glob(os.path.join(folder, "log", "*"))
    return proc


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_leave_nothing(tiny_data, tmp_path, sig, code):
    proc = _start_slow_run(tiny_data, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith(("terminated (SIGTERM)", "interrupted")), err
    assert _outputs(tmp_path) == []


def test_sigkilled_run_is_cleaned_by_the_next_run(tiny_data, tmp_path, monkeypatch):
    proc = _start_slow_run(tiny_data, tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    dead = _outputs(tmp_path)
    assert any(p.endswith(".pth") for p in dead)
    monkeypatch.chdir(tmp_path)
    result = run("EASE", "tiny", config_dict={"data_path": str(tiny_data), "show_progress": False})
    assert result["test_result"]
    left = _outputs(tmp_path)
    assert not any(p in left for p in dead if "SASRec" in os.path.basename(p)), left
    assert any("EASE" in p for p in left)  # the finished run keeps its own files
    assert not os.path.exists(tmp_path / "log" / ".unfinished")


def test_planted_journal_cannot_delete_outside_the_folder(tmp_path, monkeypatch):
    import json

    from recbole_weaverec.runfiles import recover_dead_runs

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    work = tmp_path / "work"
    (work / "log" / ".unfinished").mkdir(parents=True)
    (work / "log" / ".unfinished" / "999999.json").write_text(
        json.dumps({"pid": 2 ** 22 + 12345, "paths": [str(victim)]}))
    monkeypatch.chdir(work)
    recover_dead_runs()
    assert victim.read_text() == "keep me"


@pytest.mark.parametrize("bad", [{"eval_args": {"mode": "nonsense"}}, {"valid_metric": "NoSuchMetric@10"}])
def test_failed_runs_leave_no_folders(tiny_data, run_dir, bad):
    with pytest.raises(Exception):
        run("EASE", "tiny", config_dict={"data_path": str(tiny_data), "show_progress": False, **bad})
    assert _outputs(run_dir) == []


def test_killing_the_leaderboard_ends_its_cell(tmp_path):
    """SIGKILL of the board (no chance to clean up): its running cell stops by itself and a rerun recovers."""
    import yaml

    from conftest import write_tiny_dataset

    data = write_tiny_dataset(tmp_path / "data", "tiny")
    out = tmp_path / "out"
    path = tmp_path / "board.yaml"
    slow = {"epochs": 500, "eval_step": 1, "stopping_step": 1000, "state": "ERROR"}
    path.write_text(yaml.safe_dump({
        "name": "t", "data_path": str(data), "output_dir": str(out), "datasets": ["tiny"], "seeds": [1],
        "protocols": ["full"], "models": [{"model": "SASRec", "config": slow}]}))
    board = subprocess.Popen([sys.executable, "-m", "recbole_weaverec.leaderboard", "--config", str(path), "--quiet"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)})
    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(str(out / "cache" / "work" / "*" / "saved" / "*.pth")):
        assert board.poll() is None, "the board ended early"
        time.sleep(0.2)
    pth = glob.glob(str(out / "cache" / "work" / "*" / "saved" / "*.pth"))
    assert pth, "the cell wrote no checkpoint within 120 s"
    board.kill()
    board.wait(timeout=30)
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(pth[0]):
        time.sleep(0.2)
    assert not os.path.exists(pth[0]), "the orphaned cell kept running"
    def alive():
        return subprocess.run(["pgrep", "-f", str(out / "cache" / "work")], capture_output=True, text=True).stdout

    while time.time() < deadline and alive().strip():
        time.sleep(0.2)
    assert alive().strip() == "", "the orphaned cell is still running"
    # a rerun recovers: the cell's scratch folder is replaced and the cell computed (fast settings this time)
    path.write_text(path.read_text().replace("epochs: 500", "epochs: 1"))
    rerun = subprocess.run([sys.executable, "-m", "recbole_weaverec.leaderboard", "--config", str(path), "--quiet"],
                           cwd=tmp_path, capture_output=True, text=True,
                           env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert len(list((out / "cache" / "cells").glob("*.json"))) == 1


def test_checkpoint_dir_that_cannot_be_made_one_line(tiny_data, run_dir, capfd):
    """checkpoint_dir below a file (as unwritable as a read-only folder, also for root): one line, nothing kept."""
    from recbole_weaverec.cli import main

    (run_dir / "afile").write_text("x")
    rc = main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", "--state=ERROR", "--epochs=1",
               f"--checkpoint_dir={run_dir / 'afile' / 'ckpt'}"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: ") and "afile" in err[-1], err
    assert [p for p in _outputs(run_dir)] == []


def test_unwritable_checkpoint_file_one_line(tiny_data, run_dir, capfd, monkeypatch):
    """A full disk (ENOSPC) while saving the checkpoint: one line, and the run's log and folders are removed."""
    import errno

    import torch

    from recbole_weaverec.cli import main

    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        if str(f).endswith(".pth"):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    rc = main(["--model=SASRec", "--dataset=tiny", f"--data_path={tiny_data}", "--state=ERROR", "--epochs=1"])
    err = capfd.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: No space left on device: ") and ".pth" in err[-1], err
    assert _outputs(run_dir) == []


def test_corrupt_leaderboard_cell_is_named_and_recomputed(tiny_data, tmp_path, capsys):
    import json

    from recbole_weaverec.leaderboard import Leaderboard, validate_config

    board = Leaderboard(validate_config({"data_path": str(tiny_data), "output_dir": str(tmp_path / "out"),
                                         "datasets": ["tiny"], "seeds": [1], "protocols": ["full"],
                                         "models": ["EASE"]}),
                        runner=lambda cell: {"status": "ok", "error": "", "metrics": {"ndcg@10": 0.5}, "wall_s": 0.1,
                                             "history": "train", "model_type": "TRADITIONAL", "valid_score": 0.5})
    (cell,) = board.cells
    path = board.cache / "cells" / f"{cell['hash']}.json"
    path.parent.mkdir(parents=True)
    for junk in ('{"status": "ok", "metr', "[1, 2]", "\xff\xfe"):
        path.write_text(junk, encoding="latin-1")
        assert board.cached(cell) is None
        assert str(path) in capsys.readouterr().err
        assert board.run() == 0 and json.loads(path.read_text())["status"] == "ok"
