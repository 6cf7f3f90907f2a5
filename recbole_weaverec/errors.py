"""Errors a user can cause with bad input. Each message is one line naming the bad value and what is allowed;
the CLI prints it as ``error: ...`` and exits 2. Imports nothing, so every module can use it."""


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


class DataFileError(ConfigError):
    """A broken atomic data file: the message names the file (and line) and what is wrong."""


class CacheFileError(ConfigError):
    """A saved or cached file (a domain model, an adapter) that is unreadable and cannot be rebuilt in this run:
    the message names the file, what is wrong and how to get a good one."""


# --- adapters and merging (recbole_weaverec.merging)
class MergeError(ConfigError):
    """Bad merge input (unknown method, bad weights/density); a ConfigError, so the CLI prints one line."""


class AdapterMismatchError(MergeError):
    """Adapters or task vectors that cannot be merged: other base model, other modules or shapes."""


class UnsupportedAdapterError(MergeError):
    """An adapter whose effect is not an additive ΔW on weights (DoRA, LoRA bias, modules_to_save, conv LoRA...)."""


class AdapterNotFoundError(FileNotFoundError):
    """An adapter folder without adapter_config.json or adapter weights."""


class AdapterFileError(MergeError):
    """An adapter folder whose files are unreadable or disagree: malformed JSON, truncated or overwritten weights,
    a rank in adapter_config.json that its weights do not have."""



# --- data
class MissingTextFieldError(ConfigError):
    """An item-text field (title, fallback) that the dataset's .item file does not have."""


class MissingDomainError(FileNotFoundError):
    """A source or target domain with no atomic files under data_path (the message names the folder)."""


# --- models and encoders
class LLMNotFoundError(FileNotFoundError):
    """The causal LM is neither a local folder nor reachable on the hub (one-line message)."""


class EncoderNotFoundError(FileNotFoundError):
    """The text encoder is neither a local folder nor reachable on the hub (one-line message)."""


# --- models
class FullSortTooLargeError(ConfigError):
    """Full-sort evaluation of an LLM over more items than allowed (the message names the limit and uni29)."""


class DomainModelMismatchError(ConfigError):
    """Two domain models that do not share one encoder (other base, vocabulary or shapes)."""


# --- running and reloading
class UnknownModelError(ValueError):
    """A model name that is neither a RecBole model nor one of this package (the message lists both)."""


class CheckpointError(ValueError):
    """A file that is not a checkpoint this package can reload (one line naming the file and why)."""


class MissingAdapterError(CheckpointError):
    """A checkpoint whose LoRA adapter folders are gone (the message names the folder)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint saved for another model or dataset than the one it is loaded into."""


# --- the leaderboard
class LeaderboardConfigError(ValueError):
    """A bad leaderboard config: the message names the key and what is allowed."""


# --- tuning (recbole_weaverec.tune)
class TrialFailed(Exception):
    """A search trial whose run failed: no validation score, not counted toward the budget, never chosen."""
