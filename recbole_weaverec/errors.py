"""Errors a user can cause with bad input. Each message is one line naming the bad value and what is allowed;
the CLI prints it as ``error: ...`` and exits 2. Imports nothing, so every module can use it."""


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


class DataFileError(ConfigError):
    """A broken atomic data file: the message names the file (and line) and what is wrong."""


class CacheFileError(ConfigError):
    """A saved or cached file (a domain model, an adapter) that is unreadable and cannot be rebuilt in this run:
    the message names the file, what is wrong and how to get a good one."""
