"""The MergeRec benchmark's report (issue 15.2), from its stored rows only: the results table (learned rows: mean
and std over merge-learning seeds), paired 95% intervals over test users and the two verdicts the issue asks for:
does each fine-tuned domain model beat the pretrained encoder on its own domain, and does MergeRec beat the best
training-free merge on the average over domains.

A stored row is {domain: {"users": [ids], "recall@10": [values], "ndcg@10": [values]}} (per-user values of one
evaluation); a learned row has one such entry per seed. Learned rows are averaged per user over their seeds before
they are compared."""
import statistics

import numpy as np

from recbole_weaverec.stats import domain_average_difference, paired_difference

OWN = "fine-tuned domain model (own domain)"
PRETRAINED = "pretrained encoder (no fine-tuning)"
FREE = ["average (λ=1/K)", "task arithmetic (λ=0.2)", "TIES (density 0.2, λ=1)"]
LEARNED = ["MergeRec task-wise (TA init)", "MergeRec layer-wise (TA init)", "MergeRec layer-wise (TIES init)"]
START = {LEARNED[0]: FREE[1], LEARNED[1]: FREE[1], LEARNED[2]: FREE[2]}  # the training-free merge each learns from
DISPLAY = [OWN, PRETRAINED, *FREE, *LEARNED]
METRICS = ("recall@10", "ndcg@10")
HEADLINE = "ndcg@10"

fmt = "{:.4f}".format


def _values(entry, users, metric):
    """``entry``'s per-user values of ``metric`` in the order of ``users`` (every row of a domain has its users)."""
    where = {u: i for i, u in enumerate(entry["users"])}
    missing = [u for u in users if u not in where]
    if missing or len(where) != len(users):
        raise ValueError(f"rows evaluated on different users ({len(missing)} of {len(users)} missing)")
    values = np.asarray(entry[metric], dtype=np.float64)
    return values[[where[u] for u in users]]


def per_user(rows, name, domain, metric, users):
    """One row's per-user values on a domain (a learned row: the mean over its seeds), aligned to ``users``."""
    runs = rows[name]
    if name in LEARNED:
        return np.mean([_values(run[domain], users, metric) for run in runs.values()], axis=0)
    return _values(runs[domain], users, metric)


def means(rows, name, domains):
    """{domain: {metric: mean}} of a row; a learned row: {domain: {metric: [mean of each seed]}}."""
    runs = rows[name]
    if name in LEARNED:
        return {d: {m: [float(np.mean(run[d][m])) for run in runs.values()] for m in METRICS} for d in domains}
    return {d: {m: float(np.mean(runs[d][m])) for m in METRICS} for d in domains}


def _cell(value):
    if isinstance(value, list):
        return fmt(statistics.mean(value)) + (f" ± {statistics.stdev(value):.4f}" if len(value) > 1 else "")
    return fmt(value)


def table(rows, domains):
    head = "| model | " + " | ".join(f"{d.replace('amazon-', '')} R@10 | N@10" for d in domains) + \
           " | avg R@10 | avg N@10 | seeds |"
    lines = [head, "|" + "---|" * (2 * len(domains) + 4)]
    for name in DISPLAY:
        if name not in rows or not rows[name]:
            continue
        m = means(rows, name, domains)
        cells = [_cell(m[d][k]) for d in domains for k in METRICS]
        if name in LEARNED:  # the average over domains of each seed, then mean ± std over seeds
            avg = [[statistics.mean(m[d][k][i] for d in domains) for i in range(len(rows[name]))] for k in METRICS]
            seeds = ", ".join(str(s) for s in rows[name])
        else:
            avg = [statistics.mean(m[d][k] for d in domains) for k in METRICS]
            seeds = "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_cell(avg[0])} | {_cell(avg[1])} | {seeds} |")
    return "\n".join(lines)


def _interval(d):
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def best_free(rows, domains):
    """The training-free merge with the highest average test NDCG@10 over domains (the hardest one to beat)."""
    done = [n for n in FREE if n in rows]
    return max(done, key=lambda n: statistics.mean(means(rows, n, domains)[d][HEADLINE] for d in domains)) \
        if done else None


def comparisons(rows, domains, n_resamples=10000):
    """[(label, {domain: interval}, average-over-domains interval)] of the pairs present in ``rows``, on NDCG@10."""
    pairs = []
    if OWN in rows and PRETRAINED in rows:
        pairs.append((f"{OWN} − {PRETRAINED}", OWN, PRETRAINED))
    free = best_free(rows, domains)
    for name in LEARNED:
        if free and rows.get(name):
            pairs.append((f"{name} − {free} (best training-free)", name, free))
    for name in LEARNED:  # what the learning itself adds to the merge it starts from
        if rows.get(name) and START[name] in rows and START[name] != free:
            pairs.append((f"{name} − {START[name]} (its start)", name, START[name]))
    out = []
    for label, a, b in pairs:
        diffs, per_domain = [], {}
        for d in domains:
            users = rows[b][d]["users"]  # the reference is never a learned row
            diff = per_user(rows, a, d, HEADLINE, users) - per_user(rows, b, d, HEADLINE, users)
            diffs.append(diff)
            per_domain[d] = paired_difference(diff, np.zeros_like(diff), n_resamples=n_resamples)
        out.append((label, per_domain, domain_average_difference(diffs, n_resamples=n_resamples)))
    return out


def verdicts(found, domains):
    """The issue's two questions, answered from the intervals (an interval containing 0 is no difference)."""
    lines = []
    for label, per_domain, average in found:
        if label.startswith(OWN):
            wins = [d for d in domains if per_domain[d]["low"] > 0]
            losses = [d for d in domains if per_domain[d]["high"] < 0]
            lines.append(f"- Each fine-tuned domain model beats the pretrained encoder on its own domain: "
                         f"{'yes' if len(wins) == len(domains) else 'no'} (better on {len(wins)} of "
                         f"{len(domains)} domains, worse on {len(losses)}, no difference on the rest).")
        else:
            word = ("yes" if average["low"] > 0 else "no, it is worse" if average["high"] < 0
                    else "no difference")
            what = ("the merge it starts from" if label.endswith("(its start)")
                    else "the best training-free merge")
            lines.append(f"- {label.split(' − ')[0]} beats {what} on the average over domains: {word} "
                         f"({_interval(average)}).")
    return lines


def intervals_table(found, domains):
    lines = ["| NDCG@10 difference [95% CI] | " + " | ".join(d.replace("amazon-", "") for d in domains) +
             " | average over domains |", "|" + "---|" * (len(domains) + 2)]
    for label, per_domain, average in found:
        lines.append(f"| {label} | " + " | ".join(_interval(per_domain[d]) for d in domains) +
                     f" | {_interval(average)} |")
    return "\n".join(lines)


def _row_ndcg(rows, key, domains):
    """Average test NDCG@10 over domains of one stored row key ("name" or "name | seed s")."""
    name, _, seed = key.partition(" | seed ")
    entry = rows.get(name, {})
    entry = entry.get(seed) if seed else entry
    if not entry or not all(d in entry for d in domains):
        return None
    return statistics.mean(float(np.mean(entry[d][HEADLINE])) for d in domains)


def objective_table(objectives, learn_stats, rows, domains):
    """Objective vs optimisation: every row's distillation objective on the same held-out pseudo-users (its own
    item embeddings; lower is closer to the teachers), beside its test NDCG@10, the learner's own held-out curve,
    and whether a lower objective went with a better test metric (Spearman over the rows)."""
    from scipy.stats import spearmanr

    keys = [k for k in objectives if all(d in objectives[k] for d in domains)]
    if not keys:
        return ""
    lines = ["Objective vs optimisation: each row's distillation objective (CE + 1000·T²·KL to the domain's teacher) "
             "on the same held-out pseudo-users, which no learner trained on, with the row's own item embeddings "
             "(a function of the weights alone; the fine-tuned domain models are the teachers, so theirs is the "
             "floor: CE only), beside its average test NDCG@10; learned rows also show their learner's held-out "
             "loss (student items frozen at the initial merge) at step 0, at the kept step, and at the last step.",
             "", "| row | " + " | ".join(d.replace("amazon-", "") for d in domains) +
             " | average objective | avg N@10 | learner's held-out loss: start → kept (step) → last |",
             "|" + "---|" * (len(domains) + 4)]
    points, merges = [], []  # merges: the merged models only (not the domain models, not the pretrained start)
    for key in keys:
        per = objectives[key]
        avg = statistics.mean(per[d] for d in domains)
        ndcg = _row_ndcg(rows, key, domains)
        if ndcg is not None:
            points.append((avg, ndcg))
            if key.split(" | ")[0] in FREE + LEARNED:
                merges.append((avg, ndcg))
        curve = (learn_stats.get(key) or {}).get("valid") or []
        kept = (learn_stats.get(key) or {}).get("kept_step")
        trace = "—"
        if curve:
            at = dict((s, v) for s, v in curve)
            trace = (f"{curve[0][1]:.4f} → {at.get(kept, float('nan')):.4f} ({kept}) → {curve[-1][1]:.4f}"
                     if kept is not None else f"{curve[0][1]:.4f} → {curve[-1][1]:.4f}")
        lines.append(f"| {key.replace(' | ', ', ')} | " + " | ".join(f"{per[d]:.4f}" for d in domains) +
                     f" | {avg:.4f} | {'—' if ndcg is None else fmt(ndcg)} | {trace} |")
    for key in keys:
        name = key.split(" | ")[0]
        start = objectives.get(START.get(name))  # the learned row's initial merge, measured as its own row
        if name in LEARNED and start:
            base = statistics.mean(start[d] for d in domains)
            value = statistics.mean(objectives[key][d] for d in domains)
            lines.append(f"- {key}: learning moved the held-out objective from its start, {START[name]}, "
                         f"{base:.4f} to {value:.4f} ({value - base:+.4f}).")
    for label, pts in (("rows", points), ("merged models (training-free and learned)", merges)):
        if len(pts) >= 3:
            rho = spearmanr([p[0] for p in pts], [p[1] for p in pts])
            lines.append(f"- Rank correlation over the {len(pts)} {label} between the held-out objective and "
                         f"average test NDCG@10: Spearman ρ = {rho.statistic:+.2f} (p = {rho.pvalue:.2g}); a lower "
                         f"objective going with a better metric gives ρ < 0.")
    return "\n".join(lines)
