"""benchmarks/gpu_check.py on the tiny shape on CPU (the script a lent GPU will run at the 0.5B and 7B shapes):
every step runs and the JSON holds each step's peak memory and throughput."""
import json

import torch

from benchmarks import gpu_check


def test_gpu_check_tiny_shape_on_cpu_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "figures" / "tiny.json"
    gpu_check.main(["--shape", "tiny", "--device", "cpu", "--users", "12", "--score-batch", "1,4",
                    "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["shape"] == "tiny" and data["device"] == "cpu" and data["parameters"] > 0
    steps = {r["step"].split(" (")[0] + (" B=" + r["step"].split("B=")[1][:-1] if "B=" in r["step"] else ""): r
             for r in data["steps"]}
    assert set(steps) == {"train", "merge + fold", "score B=1", "score B=4"}, steps
    for r in data["steps"]:
        assert r["status"] == "ok", r
        assert r["peak_gib"] > 0 and r["seconds"] >= 0
    assert steps["train"]["tokens_per_s"] > 0 and steps["train"]["tokens_per_step"] == 4 * (96 + 17)
    assert torch.isfinite(torch.tensor(steps["train"]["loss"]))
    assert steps["merge + fold"]["throughput"].startswith("14 weights folded")  # 2 layers x 7 linear layers
    assert steps["score B=1"]["s_per_1000_users"] > 0 and steps["score B=4"]["users"] == 12
    assert steps["score B=4"]["max_abs_diff_vs_b1"] < 1e-4 and steps["score B=4"]["same_ranking_share"] == 1.0
    printed = capsys.readouterr().out
    assert "| step | status |" in printed and "tokens/s" in printed and "s / 1000 users" in printed


def test_a_failing_step_is_a_row_and_the_others_still_run(tmp_path, monkeypatch):
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(gpu_check, "train_step", no_memory)
    out = tmp_path / "tiny.json"
    gpu_check.main(["--shape", "tiny", "--device", "cpu", "--users", "4", "--score-batch", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["steps"]
    assert [r["status"] for r in rows] == ["out of memory", "ok", "ok"]
