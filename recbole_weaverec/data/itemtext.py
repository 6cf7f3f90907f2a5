"""Item text from a RecBole dataset: what the LLM and text-encoder models know an item by.

RecBole stores ``title:token_seq`` as word ids and ``brand:token`` as a token id; ``field2id_token`` maps them back.
Texts are indexed by RecBole's internal item id (index 0 is the padding item, text "").
"""
import html

import numpy as np

from recbole_weaverec.errors import MissingTextFieldError

DEFAULT_FIELDS = ("title", "brand", "categories")
FIELD_LABELS = {"categories": "category"}  # "title: … brand: … category: …" (MergeRec / Recformer style)


def item_fields(dataset):
    feat = dataset.item_feat
    return [] if feat is None else [f for f in feat.columns if f != dataset.iid_field]


def check_fields(dataset, fields, require_all=True):
    """Raise a one-line error naming the missing fields and the ones the dataset has."""
    present = item_fields(dataset)
    missing = [f for f in fields if f not in present]
    if (require_all and missing) or len(missing) == len(fields):
        raise MissingTextFieldError(
            f"dataset {dataset.dataset_name!r} has no item field(s) {missing}; its item fields are {present} "
            f"(set load_col.item in the dataset config, or choose other text fields)")
    return [f for f in fields if f in present]


def field_values(dataset, field):
    """Text of ``field`` for every internal item id (np.ndarray of str, "" where missing)."""
    values = dataset.item_feat[field]
    tokens = np.asarray(dataset.field2id_token[field], dtype=object)
    if values.dim() == 1:  # token
        out = tokens[values.numpy()]
        out[values.numpy() == 0] = ""  # id 0 is [PAD]
    else:  # token_seq: padded id matrix
        ids = values.numpy()
        out = np.array([" ".join(tokens[row[row > 0]]) for row in ids], dtype=object)
    return np.array([html.unescape(str(t)) for t in out], dtype=object)


def item_texts(dataset, fields=DEFAULT_FIELDS, labelled=True, max_chars=None):
    """One string per internal item id from the fields that exist, e.g. "title: X brand: Y category: Z".

    Fields a dataset lacks are skipped; if it has none of them the error names what it has.
    """
    fields = check_fields(dataset, list(fields), require_all=False)
    columns = [field_values(dataset, f) for f in fields]
    texts = []
    for parts in zip(*columns):
        if labelled:
            text = " ".join(f"{FIELD_LABELS.get(f, f)}: {p}" for f, p in zip(fields, parts) if p)
        else:
            text = " ".join(p for p in parts if p)
        texts.append(text[:max_chars] if max_chars else text)
    texts[0] = ""  # padding item
    return texts


def item_titles(dataset, field="title", fallback=None):
    """The title of every item; items without one take ``fallback`` (another field) or raise naming the field."""
    fields = [field] + ([fallback] if fallback else [])
    check_fields(dataset, fields[:1] if not fallback else fields, require_all=not fallback)
    titles = field_values(dataset, field) if field in item_fields(dataset) else np.full(dataset.item_num, "", object)
    empty = np.flatnonzero(titles[1:] == "") + 1
    if len(empty) and fallback:
        titles[empty] = field_values(dataset, fallback)[empty]
        empty = np.flatnonzero(titles[1:] == "") + 1
    if len(empty):
        example = dataset.id2token(dataset.iid_field, int(empty[0]))
        raise MissingTextFieldError(
            f"{len(empty)} item(s) of dataset {dataset.dataset_name!r} have an empty {field!r}"
            + (f" and an empty {fallback!r}" if fallback else "") + f" (e.g. item {example}); set "
            + ("another" if fallback else "a") + " fallback text field (title_fallback_field) or fix the item file")
    return list(titles)
