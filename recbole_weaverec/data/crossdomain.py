"""Source domains for cross-domain models: other RecBole datasets under the same ``data_path``.

``dataset`` is the target; ``source_domains: [amazon-beauty, ...]`` names the sources. Each source is loaded as a full
RecBole dataset with its own config (same model and settings, its own dataset name), so its item ids and texts live in
its own id space and never mix with the target's. Sources are only trained on; evaluation is on the target.
"""
import os

from recbole_weaverec.checks import name_list
from recbole_weaverec.config import ConfigError, WeaveConfig
from recbole_weaverec.errors import MissingDomainError


def raw_data_path(config):
    """The folder that holds the dataset folders (RecBole rewrites config['data_path'] to data_path/dataset)."""
    return os.path.dirname(os.path.normpath(config["data_path"]))


# the bundled sample domains (recbole_weaverec/dataset/): a cross-domain model on toys-sample weaves in
# beauty-sample unless source_domains is given
SAMPLE_SOURCES = {"toys-sample": ["beauty-sample"]}


def with_sample_sources(config):
    """Unset ``source_domains`` on a bundled sample target whose sample sources sit beside it -> those sources."""
    given = config["source_domains"] if "source_domains" in config else None
    default = SAMPLE_SOURCES.get(config["dataset"])
    if given is None and default and all(
            os.path.isfile(os.path.join(raw_data_path(config), d, f"{d}.inter")) for d in default):
        config["source_domains"] = list(default)


def domain_list(config, key="source_domains", required=False, min_len=1, allow_target=False):
    """Validated list of domain names from ``config[key]``: a list of str, existing under data_path."""
    value = config[key] if key in config else None
    if value is None or value == []:
        if required:
            raise ConfigError(f"{key} is empty: {config['model']} needs at least {min_len} domain(s), "
                              f"e.g. --{key}=\"[amazon-beauty]\"")
        return []
    if isinstance(value, str):  # "--source_domains=[a,b]" reaches us unparsed (RecBole's eval fails on "a-b")
        value = name_list(value)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}={value!r} is not allowed: expected a list of dataset names")
    if len(value) < min_len:
        raise ConfigError(f"{key}={value!r} has {len(value)} domain(s): {config['model']} needs at least {min_len}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key}={value!r} names a domain twice")
    if not allow_target and config["dataset"] in value:
        raise ConfigError(f"{key}={value!r} contains the target dataset {config['dataset']!r}: "
                          f"a source must be another domain")
    root = raw_data_path(config)
    for name in value:
        inter = os.path.join(root, name, f"{name}.inter")
        if not os.path.isfile(inter):
            raise MissingDomainError(f"domain {name!r} ({key}) not found: {inter} does not exist")
    return list(value)


def domain_config(config, name, **overrides):
    """A Config for domain ``name``: the same model and settings as ``config``, its own dataset."""
    external = dict(config.external_config_dict)
    external.update(dataset=name, data_path=raw_data_path(config), **overrides)
    return WeaveConfig(model=config.model_class, dataset=name, config_dict=external)


def check_domain_files(config, names):
    """Every source domain's atomic files checked before anything trains (they are loaded later, between modules)."""
    from recbole_weaverec.data.checks import check_dataset_files, check_text_fields

    for name in names:
        dconfig = domain_config(config, name)
        check_dataset_files(dconfig)
        check_text_fields(dconfig)


def load_domain(config, name, **overrides):
    """(config, dataset, (train, valid, test) split datasets) of domain ``name``, built by RecBole as usual."""
    from recbole.data import create_dataset

    from recbole_weaverec.data.checks import check_dataset_files

    dconfig = domain_config(config, name, **overrides)
    check_dataset_files(dconfig)  # a broken source domain is named (file, line) before RecBole reads it
    dataset = create_dataset(dconfig)
    return dconfig, dataset, dataset.build()
