"""Per-user metrics from RecBole's own evaluator, and paired bootstrap intervals over users.

``per_user_metrics`` runs a trainer's evaluation loop (RecBole's batch functions, its Collector and metric classes)
but keeps each user's value instead of the mean, with the user ids, so two models evaluated on the same users and
candidates can be compared user by user; the means equal ``trainer.evaluate``'s. ``paired_difference`` is scipy's
bootstrap of the mean per-user difference: a difference whose interval contains 0 is "no difference".
``recording_per_user`` keeps the per-user values of the evaluations a trainer runs anyway.
``domain_average_difference`` is the same for the average over domains of each domain's mean difference, users
resampled within their domain. ``mean_interval`` is the t interval of one model's mean over users (scipy.stats.t).
"""
import inspect
from contextlib import contextmanager

import numpy as np
import torch


def _batch_users(interaction, batched, uid, full):
    """The user id of each evaluated row of one batch (full ranking: one row per user; sampled candidates: the rows
    of a user share its row_idx, and its first row names it)."""
    ids = interaction[uid].cpu()
    if full:
        return ids.numpy()
    row_idx = batched[1].cpu()
    first = torch.full((int(row_idx.max()) + 1,), -1, dtype=torch.long)
    first.scatter_reduce_(0, row_idx, torch.arange(len(row_idx)), reduce="amin", include_self=False)
    return ids[first].numpy()


def struct_values(trainer, struct):
    """{"ndcg@5": values per user, ...} of a collector's data struct, through RecBole's own metric classes."""
    out = {}
    for name, metric in trainer.evaluator.metric_class.items():
        if not hasattr(metric, "topk"):
            continue
        pos_index, pos_len = metric.used_info(struct)
        takes_len = len(inspect.signature(metric.metric_info).parameters) > 1  # Hit and MRR take pos_index only
        values = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
        for k in metric.topk:
            out[f"{name}@{k}"] = np.asarray(values[:, k - 1], dtype=np.float64)
    return out


@torch.no_grad()
def per_user_metrics(trainer, eval_data):
    """(user ids [n], {"ndcg@5": values [n], ...}) for every top-k metric and k of the trainer's config."""
    from recbole.data.dataloader import FullSortEvalDataLoader

    trainer.model.eval()
    full = isinstance(eval_data, FullSortEvalDataLoader)
    trainer.tot_item_num = eval_data._dataset.item_num  # what RecBole's evaluate sets before its batch functions
    uid = trainer.config["USER_ID_FIELD"]
    batch_eval = trainer._full_sort_batch_eval if full else trainer._neg_sample_batch_eval
    users = []
    for batched in eval_data:
        interaction, scores, positive_u, positive_i = batch_eval(batched)
        trainer.eval_collector.eval_batch_collect(scores, interaction, positive_u, positive_i)
        users.append(_batch_users(interaction, batched, uid, full))
    return np.concatenate(users), struct_values(trainer, trainer.eval_collector.get_data_struct())


@contextmanager
def recording_per_user(trainer):
    """Inside the block every ``trainer.evaluate`` also keeps each user's metric values, taken from the very scores
    it computes (nothing is scored twice; an LLM user costs ~1 s here). Yields a list that gets one
    (user ids, {"ndcg@5": values, ...}) per evaluation, in call order; user ids are None where the trainer's evaluate
    does not go through RecBole's batch functions (then use ``per_user_metrics``)."""
    uid = trainer.config["USER_ID_FIELD"]
    records, users = [], []

    def recording(batch_eval, full):
        def batch(batched):
            out = batch_eval(batched)
            users.append(_batch_users(out[0], batched, uid, full))
            return out
        return batch

    evaluator = trainer.evaluator
    evaluate = evaluator.evaluate

    def evaluating(struct):
        values = struct_values(trainer, struct)
        ids = np.concatenate(users) if users else None
        n = len(next(iter(values.values()))) if values else 0
        records.append((ids if ids is not None and len(ids) == n else None, values))
        users.clear()
        return evaluate(struct)

    trainer._full_sort_batch_eval = recording(trainer._full_sort_batch_eval, True)
    trainer._neg_sample_batch_eval = recording(trainer._neg_sample_batch_eval, False)
    evaluator.evaluate = evaluating
    try:
        yield records
    finally:  # the instance attributes go; the class's methods show through again
        del trainer._full_sort_batch_eval, trainer._neg_sample_batch_eval, evaluator.evaluate


def paired_difference(a, b, confidence=0.95, n_resamples=10000, seed=0):
    """Mean of ``a - b`` over users and its bootstrap interval: {"mean", "low", "high", "n"} (percentile method)."""
    from scipy.stats import bootstrap

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"paired_difference needs two equally long per-user arrays of >= 2 users, got "
                         f"{a.shape} and {b.shape}")
    d = a - b
    if np.all(d == d[0]):  # no spread: every resample has the same mean
        return {"mean": float(d[0]), "low": float(d[0]), "high": float(d[0]), "n": len(d)}
    # resamples in batches of ~2M values: the same draws, but tens of thousands of users would otherwise hold
    # n_resamples x n floats (GBs) at once
    res = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True, batch=max(1, 2_000_000 // len(d)))
    return {"mean": float(d.mean()), "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high), "n": len(d)}


def domain_average_difference(diffs, confidence=0.95, n_resamples=10000, seed=0):
    """The mean over domains of each domain's mean per-user difference (``diffs``: one array per domain) and its
    bootstrap interval: {"mean", "low", "high", "n"}. Users are resampled within their own domain (scipy's bootstrap
    with one sample per domain, ``paired=False``), so every domain weighs the same whatever its number of users."""
    from scipy.stats import bootstrap

    diffs = [np.asarray(d, dtype=np.float64) for d in diffs]
    if not diffs or any(d.ndim != 1 or len(d) < 2 for d in diffs):
        raise ValueError(f"domain_average_difference needs per-user arrays of >= 2 users per domain, got shapes "
                         f"{[d.shape for d in diffs]}")
    mean = float(np.mean([d.mean() for d in diffs]))
    if all(np.all(d == d[0]) for d in diffs):  # no spread anywhere: every resample has the same statistic
        return {"mean": mean, "low": mean, "high": mean, "n": sum(len(d) for d in diffs)}

    def statistic(*samples, axis=-1):
        return np.mean([s.mean(axis=axis) for s in samples], axis=0)

    res = bootstrap(tuple(diffs), statistic, paired=False, confidence_level=confidence, n_resamples=n_resamples,
                    method="percentile", random_state=np.random.default_rng(seed), vectorized=True,
                    batch=max(1, 2_000_000 // max(len(d) for d in diffs)))
    return {"mean": mean, "low": float(res.confidence_interval.low), "high": float(res.confidence_interval.high),
            "n": sum(len(d) for d in diffs)}


def mean_interval(values, confidence=0.95):
    """Mean over users and its t interval: {"mean", "low", "high", "half", "n"}. A t interval rather than a bootstrap:
    with hundreds to tens of thousands of users the mean is close to normal, and it is instant and deterministic."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"mean_interval needs a per-user array of >= 2 users, got shape {v.shape}")
    mean, sem = float(v.mean()), float(stats.sem(v))
    half = 0.0 if sem == 0 else float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * sem)
    return {"mean": mean, "low": mean - half, "high": mean + half, "half": half, "n": len(v)}


def verdict(diff):
    """'better', 'worse' or 'no difference' (the interval contains 0)."""
    if diff["low"] > 0:
        return "better"
    if diff["high"] < 0:
        return "worse"
    return "no difference"
