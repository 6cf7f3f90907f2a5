"""Rebuild the quick-start sample in recbole_weaverec/dataset/ from the full domains in ../shared/data (see
recbole_weaverec/dataset/README.md)."""
import argparse
import random
from pathlib import Path

import pandas as pd

DOMAINS = {"amazon-toys": "toys-sample", "amazon-beauty": "beauty-sample", "amazon-sports": "sports-sample"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[3] / "shared" / "data"))
    ap.add_argument("--items", type=int, default=1000, help="keep the N most popular items of each domain")
    ap.add_argument("--users", type=int, default=1500, help="then sample N users with >= 5 of those items")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args()
    out_root = Path(__file__).resolve().parent
    for src_name, name in DOMAINS.items():
        src = Path(args.src) / src_name
        inter = pd.read_csv(src / f"{src_name}.inter", sep="\t", dtype=str)
        # Dense enough for non-trivial metrics on a tiny sample: popular items only, users keep their order.
        top = set(inter["item_id:token"].value_counts().index[: args.items])
        inter = inter[inter["item_id:token"].isin(top)]
        counts = inter["user_id:token"].value_counts()
        users = sorted(counts[counts >= 5].index)
        keep = set(random.Random(args.seed).sample(users, min(args.users, len(users))))
        inter = inter[inter["user_id:token"].isin(keep)].copy()
        # timestamps are positions in the user's sequence: renumber 1..n after dropping items
        inter["timestamp:float"] = inter["timestamp:float"].astype(float)
        inter = inter.sort_values(["user_id:token", "timestamp:float"], kind="stable")
        inter["timestamp:float"] = inter.groupby("user_id:token").cumcount() + 1
        item = pd.read_csv(src / f"{src_name}.item", sep="\t", dtype=str, keep_default_na=False, quoting=3)
        item = item[item["item_id:token"].isin(set(inter["item_id:token"]))]
        out = out_root / name
        out.mkdir(exist_ok=True)
        inter.to_csv(out / f"{name}.inter", sep="\t", index=False)
        item.to_csv(out / f"{name}.item", sep="\t", index=False, quoting=3)
        print(name, len(keep), "users", len(item), "items", len(inter), "interactions")


if __name__ == "__main__":
    main()
