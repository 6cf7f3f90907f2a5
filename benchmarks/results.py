"""Write one benchmark's section of benchmarks/RESULTS.md (other sections untouched; safe for concurrent writers)."""
import datetime
import fcntl
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is rewritten by the script it names; numbers are never edited by hand.\n"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def write_section(name, body, command=None):
    """Replace (or append) the section ``## name`` of RESULTS.md with the command, machine, date and ``body``."""
    command = command or "python " + " ".join(sys.argv)
    text = (f"## {name}\n\n- command: `{command}`\n- machine: {machine()}\n"
            f"- date: {datetime.date.today().isoformat()}\n\n{body.strip()}\n\n")
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = RESULTS.read_text() if RESULTS.exists() else HEADER
        pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(lambda m: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
        tmp = RESULTS.with_suffix(".tmp")
        tmp.write_text(new)
        os.replace(tmp, RESULTS)
