"""Training samples of the LLM models, from RecBole's sequential prefixes: a domain's training split and titles
(``DomainData``, in its own id space), reproducible prompts of one domain (``build_samples``), seeded mixes of
several domains (``mix_samples``: data merging, WeaveRec's hybrid modules), and their token ids and padded batches
(``encode_sample``, ``collate``)."""
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from recbole_weaverec.errors import DataFileError
from recbole_weaverec.model.llm.prompts import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One training prompt: ``domain``'s internal item ids (history oldest first, target, candidates listed)."""
    domain: str
    history: tuple
    target: int
    candidates: tuple = ()


@dataclass
class DomainData:
    """A domain's sequential training split (RecBole's augmented prefixes) and its item titles (by internal id);
    with ``train_valid_items`` also its validation split (one transition per user, trained on as the reference)."""
    name: str
    train: object  # RecBole SequentialDataset of the training split
    titles: list
    item_num: int
    valid: object = None  # RecBole SequentialDataset of the validation split, or None

    def title(self, item):
        return self.titles[int(item)]


def domain_data(name, dataset, train_split, title_field="title", fallback=None, valid_split=None):
    from recbole_weaverec.data.itemtext import item_titles

    return DomainData(name, train_split, item_titles(dataset, title_field, fallback), dataset.item_num, valid_split)


def target_valid_split(config, dataset):
    """The target's validation split, for ``train_valid_items`` (a model is built from the training split only):
    the domain is loaded again by RecBole, and its item ids must be the model's."""
    from recbole_weaverec.data.crossdomain import load_domain

    _, again, (_, valid, _) = load_domain(config, config["dataset"])
    field = dataset.iid_field
    if list(again.field2id_token[field]) != list(dataset.field2id_token[field]):
        raise DataFileError(f"domain {config['dataset']!r}: its validation split, loaded again, numbers its items "
                            f"differently from the training split; train_valid_items needs one item numbering")
    return valid


def load_source(config, name):
    """A source domain loaded as its own RecBole dataset (ids and titles never mix with the target's)."""
    from recbole_weaverec.data.crossdomain import load_domain

    dconfig, dataset, (train, valid, _) = load_domain(config, name)  # the source's own title fields (issue 21)
    return domain_data(name, dataset, train, dconfig["title_field"], dconfig["title_fallback_field"],
                       valid if config["train_valid_items"] else None)


def check_trainable(domain):
    """A domain a module trains on has training prefixes (its titles were checked when it was loaded)."""
    if len(domain.train.inter_feat) == 0:
        raise DataFileError(f"domain {domain.name!r} has no training prefixes: after RecBole's filters and split no "
                            f"user sequence is long enough to train on (check its .inter file and eval_args)")


def _domain_seed(seed, name, salt=0):
    return [int(seed), zlib.crc32(name.encode()), int(salt)]  # stable across runs (unlike hash())


def _transitions(split):
    """(histories, lengths, targets) arrays of a RecBole sequential split."""
    c = split.config
    feat = split.inter_feat
    return (feat[c["ITEM_ID_FIELD"] + c["LIST_SUFFIX"]].numpy(), feat[c["ITEM_LIST_LENGTH_FIELD"]].numpy(),
            feat[split.iid_field].numpy())


def build_samples(domain, n=None, num_candidates=30, seed=2020):
    """Up to ``n`` training prefixes of ``domain`` chosen reproducibly (all when n is None), each with
    ``num_candidates`` candidates: the true item + random items outside the user's history, shuffled. A domain
    loaded with its validation split (``train_valid_items``) first gives one sample per user answering the user's
    validation item, as the reference's training files (which add 30,000 sampled earlier prefixes)."""
    seqs, lengths, targets = _transitions(domain.train)
    rng = np.random.default_rng(_domain_seed(seed, domain.name))
    rows = np.arange(len(targets)) if n is None or n >= len(targets) else \
        np.sort(rng.choice(len(targets), size=int(n), replace=False))
    rows = [(seqs, lengths, targets, r) for r in rows]
    if domain.valid is not None:
        valid = _transitions(domain.valid)
        rows = [(*valid, r) for r in range(len(valid[2]))] + rows
    out = []
    for seqs, lengths, targets, r in rows:
        history = tuple(int(i) for i in seqs[r, :lengths[r]])
        target = int(targets[r])
        candidates = ()
        if num_candidates:
            out_of = set(history) | {target}
            k = min(int(num_candidates) - 1, domain.item_num - 1 - len(out_of))
            negatives = []
            while len(negatives) < k:  # rejection sampling: histories are tiny next to the catalogue
                item = int(rng.integers(1, domain.item_num))
                if item not in out_of:
                    out_of.add(item)
                    negatives.append(item)
            candidates = [target, *negatives]
            rng.shuffle(candidates)
            candidates = tuple(candidates)
        out.append(Sample(domain.name, history, target, candidates))
    return out


def mix_samples(sample_lists, seed=2020):
    """All samples of several domains in one seeded random order."""
    out = [s for samples in sample_lists for s in samples]
    order = np.random.default_rng([int(seed), 7]).permutation(len(out))
    return [out[i] for i in order]


def encode_sample(sample, builder, domains):
    """(input_ids, labels) of a sample; titles come from the sample's own domain only."""
    titles = domains[sample.domain].titles
    return builder.training_ids([titles[i] for i in sample.history], titles[sample.target],
                                [titles[i] for i in sample.candidates] if sample.candidates else None)


def collate(encoded, pad_id):
    """Left-padded batch: every answer ends at the last position, so the LM head only runs on the last few."""
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, (x, y) in enumerate(encoded):
        ids[i, width - len(x):] = torch.tensor(x)
        labels[i, width - len(y):] = torch.tensor(y)
        mask[i, width - len(x):] = 1
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # each sequence starts at position 0, as when scoring
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "labels": labels}
