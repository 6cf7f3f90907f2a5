"""Per-user metrics from RecBole's own evaluator, and paired bootstrap intervals over users.

``per_user_metrics`` runs a trainer's evaluation loop (RecBole's batch functions, its Collector and metric classes)
but keeps each user's value instead of the mean, with the user ids, so two models evaluated on the same users and
candidates can be compared user by user; the means equal ``trainer.evaluate``'s. ``paired_difference`` is scipy's
bootstrap of the mean per-user difference: a difference whose interval contains 0 is "no difference".
"""
import inspect

import numpy as np
import torch


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
        ids = interaction[uid].cpu()
        if full:  # one row per user
            users.append(ids.numpy())
        else:  # rows of one user share its row_idx; its first row names it
            row_idx = batched[1].cpu()
            first = torch.full((int(row_idx.max()) + 1,), -1, dtype=torch.long)
            first.scatter_reduce_(0, row_idx, torch.arange(len(row_idx)), reduce="amin", include_self=False)
            users.append(ids[first].numpy())
    struct = trainer.eval_collector.get_data_struct()
    out = {}
    for name, metric in trainer.evaluator.metric_class.items():
        if not hasattr(metric, "topk"):
            continue
        pos_index, pos_len = metric.used_info(struct)
        takes_len = len(inspect.signature(metric.metric_info).parameters) > 1  # Hit and MRR take pos_index only
        values = metric.metric_info(pos_index, pos_len) if takes_len else metric.metric_info(pos_index)
        for k in metric.topk:
            out[f"{name}@{k}"] = np.asarray(values[:, k - 1], dtype=np.float64)
    return np.concatenate(users), out


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
    res = bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="percentile",
                    random_state=np.random.default_rng(seed), vectorized=True)
    return {"mean": float(d.mean()), "low": float(res.confidence_interval.low),
            "high": float(res.confidence_interval.high), "n": len(d)}


def verdict(diff):
    """'better', 'worse' or 'no difference' (the interval contains 0)."""
    if diff["low"] > 0:
        return "better"
    if diff["high"] < 0:
        return "worse"
    return "no difference"
