"""Issue 12's probe suite: attacks, faults and bad input tried against the CLI and the leaderboard as a new user (or
an attacker) would, each in a fresh process and a fresh folder, with a verdict per probe.

    python benchmarks/bad_input_probes.py [--only SUBSTRING] [--list]

Verdicts (the first that applies):
- ``ran code``: the probe's marker file exists (an attack worked);
- ``half-written``: files of the run were left behind (log, TensorBoard folder, checkpoint, journal, scratch);
- ``traceback``: the output holds a Python traceback;
- ``unclear``: exit code or message not as promised (an error must be one ``error: ...`` line, exit != 0; a probe
  that should succeed must exit 0);
- ``as promised``.
The counts per verdict and every probe that is not "as promised" go to benchmarks/RESULTS.md ("Bad-input and
fault probes"). The fast cases are also unit tests (tests/test_bad_input.py, test_security.py, test_faults.py).
"""
import argparse
import glob
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SECTION = "Bad-input and fault probes (benchmarks/bad_input_probes.py)"
CLI = [sys.executable, str(REPO / "run_recbole_weaverec.py")]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
LEFTOVERS = ("log/**/*.log", "log_tensorboard/*", "saved/*.pth", "log/.unfinished/*", "log/*/")


def tiny_dataset(root, name="tiny", n_users=40, n_items=25, seed=0):
    """A small synthetic dataset in the Amazon layout (ordered sequences, titles)."""
    import random

    rng = random.Random(seed)
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        start = rng.randrange(n_items)
        rows += [f"u{u}\ti{(start + t) % n_items}\t{t + 1}" for t in range(rng.randint(5, 9))]
    (out / f"{name}.inter").write_text("\n".join(rows) + "\n", encoding="utf-8")
    items = ["item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq"]
    items += [f"i{i}\tWidget number {i}\tBrand{i % 5}\tToys Games" for i in range(n_items)]
    (out / f"{name}.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    return Path(root)


class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(Planted(marker), f)


# ------------------------------------------------------------------------------------------------ the probes
# Each probe: (name, expect, function(work, data, marker) -> (command, optional signal plan)).
# expect: "error" (one error line, exit != 0), "ok" (exit 0), "stopped" (a signal: exit 130/143, one last line).
def _cli(data, *args, model="EASE", state="ERROR"):
    return [*CLI, f"--model={model}", "--dataset=tiny", f"--data_path={data}", f"--state={state}", *args]


def probes():
    out = []

    def add(name, expect, build):
        out.append((name, expect, build))

    # security: planted pickles
    for model, file in (("EASE", "saved/tiny-Dataset.pth"), ("SASRec", "saved/tiny-SequentialDataset.pth"),
                        ("EASE", "saved/tiny-for-EASE-dataloader.pth")):
        add(f"planted {file} ({model})", "ok",
            lambda w, d, m, model=model, file=file: (plant(w / file, m), _cli(d, "--epochs=1", model=model))[1])
    add("planted dataset_save_path", "ok",
        lambda w, d, m: (plant(w / "x.pth", m), _cli(d, f"--dataset_save_path={w / 'x.pth'}"))[1])
    add("planted dataloaders_save_path", "ok",
        lambda w, d, m: (plant(w / "y.pth", m), _cli(d, f"--dataloaders_save_path={w / 'y.pth'}"))[1])
    # security: evaluated strings
    for key in ("reg_weight", "tie_break", "learning_rate"):
        add(f"--{key}=<code>", "error",
            lambda w, d, m, key=key: _cli(d, f"--{key}=__import__('os').system('touch {m}') or 100"))
    add("YAML !!python/object/apply", "error", lambda w, d, m: (
        (w / "a.yaml").write_text(f"reg_weight: !!python/object/apply:os.system ['touch {m}']\n"),
        _cli(d, "--config_files", str(w / "a.yaml")))[1])
    add("YAML !!python/name", "error", lambda w, d, m: (
        (w / "b.yaml").write_text("reg_weight: !!python/name:os.system\n"),
        _cli(d, "--config_files", str(w / "b.yaml")))[1])
    add("leaderboard YAML tie_break <code>", "board-failed-cell", lambda w, d, m: (
        _board(w, d, {"model": "EASE", "config": {"tie_break": f"__import__('os').system('touch {m}') or 'none'"}}),
        [sys.executable, "-m", "recbole_weaverec.leaderboard", "--config", str(w / "board.yaml"), "--quiet"])[1])
    add("KD_DAGFM teacher <code>", "error", lambda w, d, m: _cli(
        d, f"--teacher=__import__('os').system('touch {m}')", "--epochs=1", model="KD_DAGFM"))
    # bad values
    for arg in ("--eval_mode=uni0", "--eval_mode=foo", "--eval_args={'mode':'uni0'}", "--eval_args=[1]",
                "--eval_args={'split':{'RS':[0.8,0.1]}}", "--eval_args={'order':'XX'}", "--topk=0",
                "--topk=[5,abc]", "--metrics=[NoSuch]", "--metrics=[Recall,AUC]", "--metrics=Recall",
                "--valid_metric=NDCG@7", "--valid_metric=Foo@10", "--seed=abc", "--seed=1.5",
                "--reg_weight=inf", "--reg_weight=nan", "--reg_weight=-1", "--reg_weight=abc", "--reg_weight=1/0",
                "--reg_weight=().x", "reg_weight=3", "--config_files=/nonexistent.yaml"):
        add(arg, "error", lambda w, d, m, arg=arg: _cli(d, arg))
    # the keys _cli sets itself, given once with a bad value
    add("--state=LOUD", "error", lambda w, d, m: _cli(d, state="LOUD"))
    add("--model=NoSuchModel", "error", lambda w, d, m: _cli(d, model="NoSuchModel"))
    add("--dataset=nosuch", "error", lambda w, d, m: [*CLI, "--model=EASE", "--dataset=nosuch", f"--data_path={d}"])
    add("--data_path=/nonexistent", "error", lambda w, d, m: [*CLI, "--model=EASE", "--dataset=tiny",
                                                             "--data_path=/nonexistent"])
    add("--reg_weight given twice, different values", "error", lambda w, d, m: _cli(d, "--reg_weight=1",
                                                                                    "--reg_weight=2"))
    add("non-mapping YAML", "error", lambda w, d, m: ((w / "c.yaml").write_text("- a\n- b\n"),
                                                      _cli(d, "--config_files", str(w / "c.yaml")))[1])
    add("malformed YAML", "error", lambda w, d, m: ((w / "e.yaml").write_text("a: [1, 2\n"),
                                                    _cli(d, "--config_files", str(w / "e.yaml")))[1])
    add("typo key --reg_wieght=3 (warned, runs)", "ok", lambda w, d, m: _cli(d, "--reg_wieght=3"))
    add("--text_fields=[title,brand] (L3AE)", "ok", lambda w, d, m: _cli(d, "--text_fields=[title,brand]",
                                                                        model="L3AE"))
    add("unreachable hub llm_path", "error", lambda w, d, m: _cli(d, "--llm_path=someorg/none", model="LLMRec"))
    # broken data files (each replaces tiny.inter, or tiny.item)
    inter_h = "user_id:token\titem_id:token\ttimestamp:float\n"
    for name, file, text in (
            ("empty .inter", "inter", ""), ("header-only .inter", "inter", inter_h),
            ("header without :type", "inter", "user_id\titem_id:token\ttimestamp:float\nu1\ti1\t1\n"),
            ("unknown field type", "inter", "user_id:token\titem_id:token\ttimestamp:date\nu1\ti1\t1\n"),
            ("wrong header (no item_id)", "inter", "user_id:token\tproduct:token\ttimestamp:float\nu1\ti1\t1\n"),
            ("non-numeric float", "inter", inter_h + "u1\ti1\t1\nu1\ti2\tnoon\n"),
            ("too many fields", "inter", inter_h + "u1\ti1\t1\nu1\ti2\t2\textra\n"),
            ("comma-separated file", "inter", "user_id:token,item_id:token,timestamp:float\nu1,i1,1\n"),
            ("item file without item_id", "item", "title:token_seq\nWidget\n")):
        add(f"data: {name}", "error", lambda w, d, m, file=file, text=text: (
            (d / "tiny" / f"tiny.{file}").write_text(text, encoding="utf-8"), _cli(d))[1])
    add("data: non-UTF-8 bytes", "error", lambda w, d, m: (
        (d / "tiny" / "tiny.inter").write_bytes(inter_h.encode() + b"u1\ti\xff\xfe1\t1\n"), _cli(d))[1])
    add("data: duplicate interactions (warned, runs)", "ok", lambda w, d, m: (
        _append(d / "tiny" / "tiny.inter", "u0\ti1\t1\nu0\ti1\t1\n"), _cli(d))[1])
    add("data: duplicate item ids (warned, runs)", "ok", lambda w, d, m: (
        _append(d / "tiny" / "tiny.item", "i1\tAnother widget\tBrand1\tToys\n"), _cli(d))[1])
    # corrupt caches: the second run must warn, rebuild and succeed
    add("corrupt L3AE embedding cache", "ok-second", lambda w, d, m: (
        _cli(d, f"--text_cache_dir={w / 'emb'}", model="L3AE", state="WARNING"), ("corrupt", str(w / "emb" / "*.safetensors"))))
    add("corrupt leaderboard cell cache", "ok-second", lambda w, d, m: (
        (_board(w, d, "EASE"),
         [sys.executable, "-m", "recbole_weaverec.leaderboard", "--config", str(w / "board.yaml"), "--quiet"])[1],
        ("corrupt", str(w / "out" / "cache" / "cells" / "*.json"))))
    # adapter faults (LLMRec with the embedded model; each refused before anything trains)
    add("adapter_paths key that matches no domain", "error", lambda w, d, m: (
        _fake_adapter(w / "ad", weights=b""), _cli(d, f"--adapter_paths={{'tinyy': '{w / 'ad'}'}}", model="LLMRec"))[1])
    add("adapter folder without weights", "error", lambda w, d, m: (
        _fake_adapter(w / "ad", weights=None), _cli(d, f"--adapter_paths={{'tiny': '{w / 'ad'}'}}", model="LLMRec"))[1])
    add("truncated adapter safetensors", "error", lambda w, d, m: (
        _fake_adapter(w / "ad", weights=b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\""),
        _cli(d, f"--adapter_paths={{'tiny': '{w / 'ad'}'}}", model="LLMRec"))[1])
    add("malformed adapter_config.json", "error", lambda w, d, m: (
        _fake_adapter(w / "ad", weights=b"", config="{'r': 2,"),
        _cli(d, f"--adapter_paths={{'tiny': '{w / 'ad'}'}}", model="LLMRec"))[1])
    # faults
    add("checkpoint_dir below a file", "error", lambda w, d, m: ((w / "f").write_text("x"), _cli(
        d, "--epochs=1", f"--checkpoint_dir={w / 'f' / 'c'}", model="SASRec"))[1])
    slow = ("--epochs=500", "--eval_step=1", "--stopping_step=1000")
    add("SIGTERM after the checkpoint save", "stopped",
        lambda w, d, m: (_cli(d, *slow, model="SASRec"), ("after-checkpoint", signal.SIGTERM)))
    add("Ctrl-C after the checkpoint save", "stopped",
        lambda w, d, m: (_cli(d, *slow, model="SASRec"), ("after-checkpoint", signal.SIGINT)))
    add("SIGKILL, then a rerun", "ok-after-kill",
        lambda w, d, m: (_cli(d, *slow, model="SASRec"), ("after-checkpoint", signal.SIGKILL)))
    return out


def _fake_adapter(folder, weights, config='{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}'):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(config)
    if weights is not None:
        (folder / "adapter_model.safetensors").write_bytes(weights)


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def _board(work, data, model):
    import yaml

    (work / "board.yaml").write_text(yaml.safe_dump({
        "name": "probe", "data_path": str(data), "output_dir": str(work / "out"), "datasets": ["tiny"],
        "seeds": [1], "protocols": ["full"], "models": [model]}))


# ------------------------------------------------------------------------------------------------ running
def leftovers(work):
    found = []
    for pattern in LEFTOVERS:
        found += glob.glob(str(work / pattern), recursive=True)
    found += glob.glob(str(work / "out" / "cache" / "work" / "*"))
    return sorted(set(found))


def run_probe(name, expect, build, root):
    work = Path(tempfile.mkdtemp(prefix="probe-", dir=root))
    data = tiny_dataset(work / "data")
    marker = work / "PWNED"
    built = build(work, data, marker)
    cmd, plan = built if isinstance(built, tuple) and isinstance(built[1], tuple) else (built, None)
    start = time.time()
    if plan is None or plan[0] == "corrupt":
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
        rc, err = proc.returncode, proc.stderr
        if plan is not None and rc == 0:  # corrupt what the first run cached, then run again
            for path in glob.glob(plan[1]):
                Path(path).write_bytes(Path(path).read_bytes()[: os.path.getsize(path) // 2])
            proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
            rc, err = proc.returncode, proc.stderr
            expect = "ok" if "rebuilt" in err or "again" in err or "re-encod" in err else "warned"
    else:
        # a shell's background job (nohup ... &) starts with SIGINT ignored; a user's Ctrl-C reaches a foreground run
        proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 120
        while time.time() < deadline and not glob.glob(str(work / "saved" / "*.pth")) and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(plan[1])
        try:
            _, err = proc.communicate(timeout=120)
            rc = proc.returncode
        except subprocess.TimeoutExpired:  # did not stop: a verdict, not a crash of the suite
            proc.kill()
            _, err = proc.communicate()
            rc, err = "did not stop within 120 s", err + "\n(did not stop within 120 s of the signal)"
        if expect == "ok-after-kill":  # the next run in the folder must clean up the dead one's files
            rerun = subprocess.run(_cli(data), cwd=work, capture_output=True, text=True, env=ENV, timeout=600)
            rc, err = rerun.returncode, rerun.stderr
    seconds = time.time() - start
    lines = [line for line in err.strip().splitlines() if line.strip()]
    left = leftovers(work)
    if expect in ("ok", "ok-after-kill", "ok-second", "warned"):
        left = [p for p in left if "SASRec" in p] if expect == "ok-after-kill" else []
    if expect == "board-failed-cell":
        import csv

        table = work / "out" / "results.csv"
        cells = list(csv.DictReader(open(table, encoding="utf-8"))) if table.is_file() else []
        promised = rc == 1 and len(cells) == 1 and cells[0]["status"] == "failed" and \
            "looks like code" in cells[0]["error"]
    elif expect == "error":
        promised = rc != 0 and bool(lines) and lines[-1].startswith("error: ") and \
            sum(line.startswith("error: ") for line in lines) == 1
    elif expect == "stopped":
        promised = rc in (130, 143) and bool(lines) and lines[-1].startswith(("terminated", "interrupted"))
    else:
        promised = rc == 0 and expect != "warned"  # a corrupt cache must be named (warned about) when rebuilt
    if marker.exists():
        verdict = "ran code"
    elif left:
        verdict = "half-written"
    elif "Traceback (most recent call last)" in err:
        verdict = "traceback"
    elif not promised:
        verdict = "unclear"
    else:
        verdict = "as promised"
    return {"probe": name, "verdict": verdict, "rc": rc, "last_line": lines[-1][:200] if lines else "",
            "left": [os.path.relpath(p, work) for p in left], "seconds": round(seconds, 1)}


def report(rows):
    from benchmarks.results import write_section

    verdicts = ("as promised", "unclear", "traceback", "half-written", "ran code")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in verdicts}
    body = [f"{len(rows)} probes, each in a fresh process and folder (tiny synthetic dataset).", "",
            "| verdict | probes |", "|---|---|", *[f"| {v} | {counts[v]} |" for v in verdicts], ""]
    bad = [r for r in rows if r["verdict"] != "as promised"]
    if bad:
        body += ["Probes not as promised:", "", "| probe | verdict | exit | last line / files left |", "|---|---|---|---|"]
        body += [f"| `{r['probe']}` | {r['verdict']} | {r['rc']} | "
                 f"{(', '.join(r['left']) or r['last_line']).replace('|', '/')} |" for r in bad]
    write_section(SECTION, "\n".join(body))
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="run only probes whose name contains this")
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    chosen = [x for x in probes() if not args.only or args.only in x[0]]
    if args.list:
        print("\n".join(name for name, _, _ in chosen))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="weaverec-probes-") as root:
        for name, expect, build in chosen:
            row = run_probe(name, expect, build, root)
            rows.append(row)
            print(f"{row['verdict']:13s} {row['seconds']:6.1f}s  {name}  -> {row['last_line'][:110]}", flush=True)
    counts = report(rows) if not args.only else None
    print(counts or "(--only: RESULTS.md not written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
