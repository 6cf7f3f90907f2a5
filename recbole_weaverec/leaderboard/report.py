"""The report from the result rows: results.csv, results.md (headline tables: mean ± 95% interval over users, the best
bold only when significantly better than the runner-up; detailed tables: mean ± std over seeds) and one PNG bar chart
per protocol and metric (error bars: the 95% interval over users)."""
import contextlib
import csv
import datetime
import json
import math
import os
import platform
from pathlib import Path

from recbole_weaverec.files import replacing
from recbole_weaverec.leaderboard.significance import NO_PER_USER, compare, group_rows, interval, seed_average

METRIC_NAMES = {"recall": "Recall", "ndcg": "NDCG", "hit": "Hit", "mrr": "MRR", "precision": "Precision",
                "map": "MAP", "itemcoverage": "ItemCoverage", "averagepopularity": "AveragePopularity"}


def metric_name(key):
    """'ndcg@10' -> 'NDCG@10' (RecBole reports metrics in lower case)."""
    base, _, k = key.partition("@")
    return METRIC_NAMES.get(base.lower(), base) + (f"@{k}" if k else "")


def write_csv(rows, path, cfg=None):
    metrics = []
    for r in rows:
        metrics += [m for m in r["metrics"] if m not in metrics]
    metrics.sort(key=_metric_order(cfg, list(cfg["protocols"]) if cfg else [], metrics))
    fields = ["protocol", "model", "label", "dataset", "source_domains", "seed", "status", "history", "tie_break",
              "tuning", "tuned_params", "model_type", "wall_s", "valid_score", *[metric_name(m) for m in metrics],
              "error", "hash"]
    with replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            out = {k: r[k] for k in fields if k in r}
            out["tuned_params"] = json.dumps(r["tuned_params"], sort_keys=True) if r.get("tuned_params") else ""
            out.update({metric_name(m): f"{v:.6g}" for m, v in r["metrics"].items()})
            w.writerow(out)


def mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(rows):
    """(protocol, dataset, label, sources) -> {metrics: {m: (mean, std)}, n, total, wall, history, errors}."""
    groups = {}
    for r in rows:
        key = (r["protocol"], r["dataset"], r["label"], r["sources"])
        g = groups.setdefault(key, {"values": {}, "n": 0, "total": 0, "wall": [], "history": "", "tie_break": "",
                                    "errors": [], "statuses": set(), "tuning": r.get("tuning") or "defaults",
                                    "tuned_params": r.get("tuned_params")})
        g["total"] += 1
        g["statuses"].add(r["status"])
        if r["status"] == "ok":
            g["n"] += 1
            g["wall"].append(float(r["wall_s"]))
            g["history"] = r["history"]
            g["tie_break"] = r.get("tie_break", "")
            g["model_type"] = r.get("model_type") or ""
            for m, v in r["metrics"].items():
                g["values"].setdefault(m, []).append(v)
        elif r["status"] in ("failed", "skipped") and r["error"] and r["error"] not in g["errors"]:
            g["errors"].append(r["error"])
    for g in groups.values():
        g["metrics"] = {m: mean_std(v) for m, v in g["values"].items()}
    return groups


def _fmt(mean, std, n, digits=4):
    return f"{mean:.{digits}f}" if n < 2 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _conditions(g, protocol=None):
    """'train+valid / popularity': the history a model scores test users from, and how it orders equal scores; in
    full ranking also whether the user's own training items stay in the ranking (RecBole removes them for general
    models only, so only a sequential model can recommend a repeat purchase)."""
    out = f"{g['history'] or '-'} / {g['tie_break'] or '-'}"
    if protocol == "full":
        kind = g.get("model_type") or ""
        out += " / " + ("ranked" if kind == "SEQUENTIAL" else "removed" if kind else "-")
    return out


def _conditions_header(protocol):
    return "history / ties / seen items" if protocol == "full" else "history / ties"


def _tuning(g):
    return g["tuning"] if g else "-"


def _columns(cfg, protocol, groups):
    spec = cfg["protocols"].get(protocol, {}).get("columns") if cfg else None
    present = []
    for (p, *_), g in groups.items():
        if p == protocol:
            present += [m for m in g["metrics"] if m not in present]
    if spec:
        return [m.lower() for m in spec if m.lower() in present]
    return sorted(present, key=_metric_order(cfg, [protocol], present))


def _metric_order(cfg, protocols, present):
    """Sort key: the protocols' ``metrics`` lists (RecBole's order, e.g. Recall before NDCG), then k as a number, so
    columns do not follow the key order a cell file happens to store (archived cells are key-sorted)."""
    names = []
    if cfg:
        configs = [cfg["protocols"].get(p, {}).get("config") or {} for p in protocols] + [cfg.get("config") or {}]
        for config in configs:
            names += [str(m).lower() for m in config.get("metrics") or [] if str(m).lower() not in names]
    names += [m.split("@")[0] for m in present if m.split("@")[0] not in names]

    def key(m):
        base, _, k = m.partition("@")
        return names.index(base), int(k) if k.isdigit() else -1, m
    return key


def _headline(cfg, protocol, columns):
    h = (cfg["protocols"].get(protocol, {}).get("headline") if cfg else None) or ""
    if h.lower() in columns:
        return h.lower()
    for pref in ("ndcg@10", "ndcg@5"):
        if pref in columns:
            return pref
    return columns[0] if columns else None


def _bold_best(cells, means):
    """Bold every cell whose mean equals the column's best (higher is better for every ranking metric)."""
    valid = [m for m in means if m is not None]
    if not valid:
        return cells
    best = max(valid)
    return [f"**{c}**" if m is not None and round(m, 4) == round(best, 4) else c for c, m in zip(cells, means)]


def markdown_table(header, body, means_by_col):
    """``body``: rows of strings; ``means_by_col``: column index -> per-row means (None = no value) to bold."""
    body = [list(r) for r in body]
    for col, means in means_by_col.items():
        bolded = _bold_best([r[col] for r in body], means)
        for r, c in zip(body, bolded):
            r[col] = c
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _model_order(rows):
    order = []
    for r in rows:
        if (r["label"], r["sources"]) not in order:
            order.append((r["label"], r["sources"]))
    return order


def render_markdown(rows, cfg=None, charts=None, now=None):
    """The leaderboard as markdown: per protocol a headline table (models x datasets, mean ± 95% interval over
    users, significant best in bold) and one detailed table per dataset (mean ± std over seeds, best in bold)."""
    groups = aggregate(rows)
    by_group = group_rows(rows)
    name = cfg["name"] if cfg else "leaderboard"
    now = now or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    seeds = sorted({r["seed"] for r in rows})
    command = f"`python -m recbole_weaverec.leaderboard --config {cfg['source']}` " if cfg and cfg.get("source") else ""
    out = [f"# Leaderboard: {name}", "",
           f"Generated {now} by {command}on {machine()}.",
           f"Seeds: {', '.join(map(str, seeds))}. Headline tables: mean ± half-width of the 95% t interval of the "
           f"mean over test users (per-user values averaged over the finished seeds first); **bold** = best in its "
           f"column and better than the runner-up by a paired bootstrap over users (95% interval of the mean "
           f"per-user difference above 0); a footnote names the rows tied with the best otherwise. Detailed tables: "
           f"mean ± sample std over the finished seeds, **bold** = highest mean.", ""]
    if cfg:
        out += [f"Evaluated users (`eval_sample_users`) and uniN candidates: drawn with seed {cfg['sample_seed']} "
                f"for every model and seed, so all models of a table rank the same candidates of the same users. "
                f"Test metrics.", ""]
    out += ["`history / ties` = the interactions a model sees when it scores a test user, and how it orders equal "
            "scores. `train+valid` for sequential models (the validation item is the last one of the input "
            "sequence) and for our closed forms (`test_history: train_valid`, their default); `train` for RecBole's "
            "general models (Pop, BPR, LightGCN, recbole:EASE), which never see the validation item as input. Ties: "
            "`popularity` (our closed forms' default `tie_break`) or `none` (RecBole's item order). Our EASE equals "
            "RecBole's EASE only with `test_history: train` and `tie_break: none`. `seen items` (full ranking): "
            "`removed` = RecBole takes the user's training items out of the ranking (general and closed-form "
            "models), `ranked` = every item stays in it (sequential models, as in the official MergeRec evaluator), "
            "so only those can recommend an item the user already has (a repeat purchase).", ""]
    stale = list(dict.fromkeys(r["label"] for r in rows if r["status"] == "ok" and not r.get("per_user")))
    if stale:
        out += [f"_{', '.join(stale)}: {NO_PER_USER}(s) to get intervals and paired tests (cached by a version "
                f"that did not keep per-user metrics)._", ""]
    pending = sum(r["status"] == "pending" for r in rows)
    if pending:
        out += [f"_{pending} cell(s) not run yet._", ""]
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))
    for protocol in protocols:
        prow = [r for r in rows if r["protocol"] == protocol]
        datasets = list(dict.fromkeys(r["dataset"] for r in prow))
        columns = _columns(cfg, protocol, groups)
        head = _headline(cfg, protocol, columns)
        desc = ("full ranking of the whole catalogue" if protocol == "full"
                else f"the true item + {protocol[3:]} items sampled uniformly from those the user never interacted with")
        out += [f"## Protocol `{protocol}` ({desc})", ""]
        # models without a finished or failed cell yet are listed, not shown as rows of dashes
        ran = {(r["label"], r["sources"]) for r in prow if r["status"] in ("ok", "failed")}
        models = [m for m in _model_order(prow) if m in ran]
        waiting = [label for label, src in _model_order(prow) if (label, src) not in ran]
        if waiting:
            out += [f"Not run yet (or not installed): {', '.join(dict.fromkeys(waiting))}.", ""]
        if not models:
            continue
        if head:
            out += [f"Test {metric_name(head)}:", ""]
            out += _headline_table(protocol, head, models, datasets, groups, by_group)
            if charts and (protocol, head) in charts:
                out += [f"![{protocol} {metric_name(head)}]({charts[(protocol, head)]})", ""]
        for d in datasets:
            out += [f"### `{protocol}` · {d}", ""]
            body, means = [], {}
            for label, src in models:
                g = groups.get((protocol, d, label, src))
                if g is None:
                    continue
                line = [label, src, _conditions(g, protocol), _tuning(g)]
                for j, m in enumerate(columns):
                    if m in g["metrics"]:
                        mean, std = g["metrics"][m]
                        line.append(_fmt(mean, std, g["n"]))
                        means.setdefault(j + 4, []).append(mean)
                    else:
                        line.append(_missing(g))
                        means.setdefault(j + 4, []).append(None)
                wall = f"{sum(g['wall']) / len(g['wall']):.0f}" if g["wall"] else "-"
                line += [wall, f"{g['n']}/{g['total']}"]
                body.append(line)
            header = ["model", "sources", _conditions_header(protocol), "tuning", *[metric_name(m) for m in columns],
                      "time (s)", "seeds"]
            out += [markdown_table(header, body, means), ""]
            notes = [(label, e) for (p, dd, label, _), g in groups.items() if p == protocol and dd == d
                     for e in g["errors"]]
            for label, e in notes:
                out.append(f"- {label}: {e}")
            if notes:
                out.append("")
    if cfg:
        out += ["## Settings", "", f"- every cell: `{_settings(cfg['config'])}`" if cfg["config"] else "- every cell: -"]
        out += [f"- `{p}` table: `{_settings(spec['config'])}`" for p, spec in cfg["protocols"].items()]
        out += [f"- {m['label']}: `{_settings(m['config'])}`" for m in cfg["models"] if m["config"]]
        out += ["- other settings: each model's defaults (properties/model/NAME.yaml for ours, RecBole's for "
                "its built-ins)"]
        out += _tuned_section(groups, cfg)
    return "\n".join(out).rstrip() + "\n"


def _headline_table(protocol, head, models, datasets, groups, by_group):
    """Models x datasets: mean ± 95% interval where the cells kept per-user data (the mean alone otherwise); the
    best bold only where significant (``significance.compare``), with a footnote per column where it is not."""
    finished = {k[2:]: g for k, g in groups.items() if k[0] == protocol and g["n"]}  # history / ties: any dataset's
    body = [[label, src, _conditions(finished[(label, src)], protocol) if (label, src) in finished else "-",
             _tuning(finished.get((label, src)))] for label, src in models]
    notes = []
    for d in datasets:
        entries, texts = [], []
        for label, src in models:
            g = groups.get((protocol, d, label, src))
            if not (g and head in g["metrics"]):
                texts.append(_missing(g))
                entries.append((label, None, None))
                continue
            data, why = seed_average(by_group[(protocol, d, label, src)], head)
            if data is not None:
                ci = interval(data)
                texts.append(f"{ci['mean']:.4f} ± {ci['half']:.4f}")
                entries.append((label, ci["mean"], data))
            else:
                texts.append(f"{g['metrics'][head][0]:.4f}")
                entries.append((label, g["metrics"][head][0], None))
                if why and why != NO_PER_USER:
                    notes.append(f"- `{d}`, {label}: {why}")
        best, note = compare(entries)
        for line, text, (label, _, _) in zip(body, texts, entries):
            line.append(f"**{text}**" if label == best else text)
        if note:
            notes.append(f"- `{d}`: {note}")
    lines = [markdown_table(["model", "sources", _conditions_header(protocol), "tuning", *datasets], body, {}), ""]
    return lines + (notes + [""] if notes else [])


def _settings(d):
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _missing(g):
    if g is None:
        return "-"
    if "failed" in g["statuses"]:
        return "failed"
    if "skipped" in g["statuses"]:
        return "n/a"
    return "pending"


def write_charts(rows, cfg, out_dir):
    """One grouped bar chart per protocol and metric (datasets on x, one bar per model); error bars: the 95% interval
    of the mean over users, for the bars whose cells kept per-user data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = aggregate(rows)
    by_group = group_rows(rows)
    charts = {}
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        prow = [r for r in rows if r["protocol"] == protocol]
        datasets = list(dict.fromkeys(r["dataset"] for r in prow))
        models = [m for m in _model_order(prow)
                  if any(groups.get((protocol, d, *m), {}).get("n") for d in datasets)]
        if not models:
            continue
        for metric in _columns(cfg, protocol, groups):
            fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + len(datasets) * (0.35 * len(models) + 0.6)), 4.2))
            width = 0.8 / len(models)
            cmap = plt.get_cmap("tab20")
            for i, (label, src) in enumerate(models):
                xs, ys, ex, ey, es = [], [], [], [], []
                for j, d in enumerate(datasets):
                    g = groups.get((protocol, d, label, src))
                    if g and metric in g["metrics"]:
                        x, m = j - 0.4 + width * (i + 0.5), g["metrics"][metric][0]
                        data, _ = seed_average(by_group[(protocol, d, label, src)], metric)
                        if data is not None:
                            ci = interval(data)
                            m = ci["mean"]
                            ex.append(x)
                            ey.append(m)
                            es.append(ci["half"])
                        xs.append(x)
                        ys.append(m)
                name = label if src == "-" else f"{label} ({src})"
                ax.bar(xs, ys, width, label=name, color=cmap(i % 20))
                if ex:
                    ax.errorbar(ex, ey, yerr=es, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
            ax.set_xticks(range(len(datasets)))
            ax.set_xticklabels(datasets)
            ax.set_ylabel(f"test {metric_name(metric)} (error bars: 95% interval over users)")
            ax.set_title(f"{cfg['name'] if cfg else ''} · protocol {protocol} · {metric_name(metric)}")
            ax.legend(fontsize=7, ncol=2 if len(models) > 6 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            ax.grid(axis="y", alpha=0.3)
            fig.tight_layout()
            fname = f"{protocol}_{metric_name(metric).replace('@', '-')}.png"
            fig.savefig(Path(out_dir) / fname, dpi=110)
            plt.close(fig)
            charts[(protocol, metric)] = fname
    return charts


def machine():
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    desc = f"{cpu}, {os.cpu_count()} cores"
    with contextlib.suppress(Exception):
        import torch

        desc += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc



def _tuned_section(groups, cfg):
    """The values each tuned entry runs with, per table and dataset, and the search that chose them."""
    tuned = [(k, g) for k, g in groups.items() if g["tuned_params"]]
    spaces = {m["label"]: m["tune"] for m in cfg["models"] if m.get("tune") is not None}
    if not tuned and not spaces:
        return []
    t = cfg.get("tuning") or {}
    out = ["", "## Tuning", "",
           f"Entries with a `tune:` block are searched on the validation split of their first seed (Optuna: "
           f"exhaustively when every value is a choice, TPE otherwise; sampler seed {t.get('seed')}), with the same "
           f"budget of {t.get('trials')} trials each (a whole grid when it is smaller); the test split never takes "
           f"part. Every seed then runs with the chosen values. `--untuned` gives the rows with defaults.", ""]
    out += [f"- {label} searched: `{_settings(space.describe())}`" for label, space in spaces.items()]
    if tuned:
        out += ["", "| table | model | sources | dataset | chosen |", "|---|---|---|---|---|"]
        out += [f"| {p} | {label} | {src} | {d} | `{_settings(dict(sorted(g['tuned_params'].items())))}` |"
                for (p, d, label, src), g in tuned]
    return out
