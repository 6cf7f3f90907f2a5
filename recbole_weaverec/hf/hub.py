"""Whether a Hugging Face hub name can be had at all, decided in about a second.

Without network and without HF_HUB_OFFLINE, transformers retries for ~50 s and then prints two tracebacks. Here a
hub name that is not in the local HF cache is checked with one TCP connection to the hub (3 s timeout) first.
"""
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


def offline():
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def in_cache(name, filename="config.json"):
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(name, filename), str)


def hub_reachable(timeout=CONNECT_TIMEOUT_S):
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def unavailable_reason(name):
    """None if ``name`` can be loaded (cached, or the hub answers); else why not, for a one-line error."""
    if in_cache(name):
        return None
    if offline():
        return "not in the Hugging Face cache and the hub is offline (HF_HUB_OFFLINE)"
    if not hub_reachable():
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        return f"not in the Hugging Face cache and the hub ({host}) cannot be reached"
    return None
