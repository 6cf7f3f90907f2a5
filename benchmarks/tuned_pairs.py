"""Issue 18.5: what tuning changes, read from a board's cache (nothing is run). Per protocol and dataset: every tuned
entry's chosen values, validation score, test headline metric with its 95% interval, and paired bootstrap
differences over users (same users and candidates in every cell of a table): each pair given by --pair A:B.

    python benchmarks/tuned_pairs.py --config leaderboards/amazon.yaml --protocol full --pair L3AE:EASE \
        --pair RDLAE:EASE --pair EASE:Pop --write
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from benchmarks.results import write_section  # noqa: E402
from recbole_weaverec.leaderboard import Leaderboard  # noqa: E402
from recbole_weaverec.leaderboard.config import load_config  # noqa: E402
from recbole_weaverec.leaderboard.significance import group_rows, interval, seed_average  # noqa: E402
from recbole_weaverec.stats import domain_average_difference, paired_difference, verdict  # noqa: E402


def _values(params):
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in (params or {}).items())


def report(cfg, protocol, pairs, datasets=None, untuned=(), average=False, labels_only=()):
    """``untuned``: labels whose rows are their defaults runs (the ``--untuned`` board), e.g. a model whose search
    does not fit the session; every other row is the tuned board's."""
    rows = [r for r in Leaderboard(cfg).rows() if r["label"] not in untuned]
    if untuned:
        rows += [r for r in Leaderboard(cfg, tuned=False).rows() if r["label"] in untuned]
    rows = [r for r in rows if r["protocol"] == protocol and (not datasets or r["dataset"] in datasets)]
    head = (cfg["protocols"][protocol]["headline"] or "NDCG@10").lower()
    groups = group_rows(rows)
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    # a row is (label, sources): a merge or cross-domain row carries its sources ("-" for single-domain ones)
    labels = list(dict.fromkeys((r["label"], r["sources"]) for r in rows if r["status"] == "ok"
                                and (not labels_only or r["label"] in labels_only)))
    lines = [f"Protocol `{protocol}`, test {head} (mean ± 95% t interval over users; every cell of a table scores "
             f"the same users). Values chosen on validation (`tuning.trials` = {cfg['tuning']['trials']}).", "",
             "| dataset | model | tuning | chosen | valid score | test " + head + " | time (s) |",
             "|---|---|---|---|---|---|---|"]
    data = {}
    for d in datasets:
        for label, sources in labels:
            g = groups.get((protocol, d, label, sources))
            if not g or g[0]["status"] != "ok":
                continue
            if (d, label) in data:  # --pair names labels only
                raise SystemExit(f"tuned_pairs: label {label!r} has rows with several sources on {d}; give each "
                                 "its own label in the board config")
            values, _ = seed_average(g, head)
            data[(d, label)] = values
            ci = interval(values) if values is not None else None
            shown = f"{ci['mean']:.4f} ± {ci['half']:.4f}" if ci else f"{g[0]['metrics'].get(head, float('nan')):.4f}"
            lines.append(f"| {d} | {label} | {g[0]['tuning']} | {_values(g[0]['tuned_params']) or '-'} | "
                         f"{float(g[0]['valid_score']):.4f} | {shown} | {float(g[0]['wall_s']):.0f} |")
    lines += ["", "Paired differences over users (bootstrap, 10,000 resamples; 'no difference' when the interval "
              "holds 0):", "", "| dataset | difference | mean [95% CI] | relative | verdict |", "|---|---|---|---|---|"]
    def row(where, a, b, diff, base):
        rel = diff["mean"] / base if base else float("nan")
        return (f"| {where} | {a} − {b} | {diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}] | "
                f"{rel:+.1%} | {verdict(diff)} |")

    paired = {}  # (a, b): [(per-user a − b, mean of b)] over the datasets scoring both on the same users
    for d in datasets:
        for a, b in pairs:
            x, y = data.get((d, a)), data.get((d, b))
            if x is None or y is None or x["users"] != y["users"]:
                continue
            paired.setdefault((a, b), []).append((x["values"] - y["values"], float(y["values"].mean())))
            lines.append(row(d, a, b, paired_difference(x["values"], y["values"]), paired[(a, b)][-1][1]))
    if average:  # the mean over datasets of each one's mean difference, users resampled within their dataset
        for (a, b), found in paired.items():
            if len(found) >= 2:
                diff = domain_average_difference([values for values, _ in found])
                lines.append(row(f"average of {len(found)}", a, b, diff, sum(m for _, m in found) / len(found)))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--protocol", default="full")
    p.add_argument("--pair", action="append", default=[], help="A:B, two labels of the board")
    p.add_argument("--dataset", action="append", default=[], help="only this dataset (repeatable)")
    p.add_argument("--untuned", action="append", default=[], help="this label's defaults row (repeatable)")
    p.add_argument("--average", action="store_true", help="also each pair's mean difference over the datasets that "
                   "have both rows (every dataset weighs the same; users resampled within their dataset)")
    p.add_argument("--label", action="append", default=[], help="only this label's rows (repeatable; default: every "
                   "row; the labels of --pair are always kept)")
    p.add_argument("--write", action="store_true", help="write the section of benchmarks/RESULTS.md")
    p.add_argument("--note", action="append", default=[], help="a line said under the tables (repeatable): the "
                                                                "budget, what was not run")
    p.add_argument("--section", default=None, help="its title (default: 'Tuned closed forms (CONFIG, PROTOCOL)')")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    pairs = [tuple(x.split(":", 1)) for x in args.pair]
    bad = [x for x, pair in zip(args.pair, pairs) if len(pair) != 2 or not all(pair)]
    if bad:
        p.error(f"--pair {bad[0]!r}: give two labels of the board as A:B")
    keep = set(args.label) | {x for pair in pairs for x in pair} if args.label else set()
    body = report(cfg, args.protocol, pairs, set(args.dataset), set(args.untuned), args.average, keep)
    if args.note:
        body += "\n\n" + "\n".join(f"- {line}" for line in args.note)
    print(body)
    if args.write:
        write_section(args.section or f"Tuned closed forms ({Path(args.config).stem}, {args.protocol})", body)


if __name__ == "__main__":
    main()
