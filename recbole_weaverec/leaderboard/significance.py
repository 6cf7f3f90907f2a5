"""The report's per-user statistics: a model's per-user values averaged over its seeds, their 95% interval, and
whether the best row of a headline column is significantly better than the runner-up (``recbole_weaverec.stats``:
t interval of the mean, paired bootstrap of the per-user difference)."""
import hashlib

import numpy as np

from recbole_weaverec.stats import mean_interval, paired_difference

NO_PER_USER = "no per-user data: rerun the cell"
_DIFFS = {}  # the board renders after every cell: each paired bootstrap of the same two arrays is computed once


def group_rows(rows):
    """(protocol, dataset, label, sources) -> the rows of that model on that dataset (one per seed)."""
    out = {}
    for r in rows:
        out.setdefault((r["protocol"], r["dataset"], r["label"], r["sources"]), []).append(r)
    return out


def seed_average(rows, metric):
    """One model's per-user ``metric`` averaged over its finished seeds: ({"users", "values"}, None), or
    (None, why not): None when no seed finished, NO_PER_USER when a seed has none, or the seeds' users differ."""
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None, None
    data = []
    for r in ok:
        pu = r.get("per_user") or {}
        users, values = pu.get("users"), (pu.get("metrics") or {}).get(metric)
        if users is None or values is None or len(values) != len(users) or len(users) < 2:
            return None, NO_PER_USER
        data.append((r["seed"], users, values))
    seed, users, _ = data[0]
    for other, u, _ in data[1:]:
        if u != users:  # eval_sample_seed keeps the users of every seed: this is a cache from another setting
            return None, (f"seeds {seed} and {other} were scored on different users ({len(users)} vs {len(u)}): "
                          f"not averaged")
    values = np.mean([np.asarray(v, dtype=np.float64) for _, _, v in data], axis=0)
    return {"users": users, "values": values}, None


def interval(data):
    """The 95% t interval of the mean over users: {"mean", "half", ...} (stats.mean_interval)."""
    return mean_interval(data["values"])


def _difference(a, b):
    key = hashlib.sha1(a.tobytes() + b"|" + b.tobytes()).hexdigest()
    if key not in _DIFFS:
        _DIFFS[key] = paired_difference(a, b)
    return _DIFFS[key]


def compare(entries):
    """``entries``: [(name, mean or None, seed-averaged data or None)] of one column. Returns (the name to bold or
    None, a footnote or None). The best is bold only when the paired bootstrap 95% interval of its per-user
    difference to the runner-up excludes 0; otherwise the footnote names the rows tied with it."""
    valued = sorted((e for e in entries if e[1] is not None), key=lambda e: -e[1])
    if len(valued) < 2:
        return (valued[0][0] if valued else None), None
    (best, _, top), (second, _, runner) = valued[0], valued[1]
    if top is None or runner is None:
        return None, f"{best} vs {second} not tested (no per-user data)"
    if top["users"] != runner["users"]:
        return None, (f"{best} and {second} were scored on different users ({len(top['users'])} vs "
                      f"{len(runner['users'])}): not compared")
    diff = _difference(top["values"], runner["values"])
    if diff["low"] > 0:
        return best, None
    tied = [name for name, _, d in valued[1:]
            if d is not None and d["users"] == top["users"] and _difference(top["values"], d["values"])["low"] <= 0]
    return None, (f"{best} is not significantly better than {second} (difference {diff['mean']:+.4f}, 95% CI "
                  f"[{diff['low']:+.4f}, {diff['high']:+.4f}] over {diff['n']} users); statistically tied with {best}: "
                  f"{', '.join(tied)}")
