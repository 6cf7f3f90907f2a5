import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

import recbole_weaverec  # noqa: E402,F401  (compat before RecBole)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_DATA = REPO / "recbole_weaverec" / "dataset"


def needs_shared_data():
    return pytest.mark.skipif(not SHARED_DATA.is_dir(),
                              reason=f"real Amazon domains not found at {SHARED_DATA}")


def write_tiny_dataset(root, name="tiny", n_users=40, n_items=25, seq_len=(5, 9), seed=0, titles=True):
    """A synthetic dataset in the Amazon layout: users with ordered sequences, items with title/brand/categories."""
    import random

    rng = random.Random(seed)
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    rows = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u in range(n_users):
        length = rng.randint(*seq_len)
        start = rng.randrange(n_items)
        for t in range(length):  # mostly consecutive items, so there is signal to learn
            item = (start + t) % n_items if rng.random() < 0.8 else rng.randrange(n_items)
            rows.append(f"u{u}\ti{item}\t{t + 1}")
    (out / f"{name}.inter").write_text("\n".join(rows) + "\n", encoding="utf-8")
    header = "item_id:token\ttitle:token_seq\tbrand:token\tcategories:token_seq" if titles else "item_id:token\tbrand:token"
    irows = [header]
    for i in range(n_items):
        irows.append(f"i{i}\tWidget number {i} deluxe\tBrand{i % 5}\tToys Games Widgets" if titles
                     else f"i{i}\tBrand{i % 5}")
    (out / f"{name}.item").write_text("\n".join(irows) + "\n", encoding="utf-8")
    return Path(root)


@pytest.fixture
def tiny_data(tmp_path):
    return write_tiny_dataset(tmp_path / "data")


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """Run inside a temporary folder so logs and checkpoints of a test go there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
