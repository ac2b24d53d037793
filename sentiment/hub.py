"""Whether the Hugging Face hub is reachable, decided once, before any Hugging Face library is imported.

On a machine that cannot reach the hub (an air-gapped cluster node), huggingface_hub retries every
request five times with backoff: `sentiment train` with a hub model or dataset spent ~50 s printing
retries before its error, and a model already in the local HF cache was only used after them. When
the hub's host does not resolve, we switch the libraries to offline mode instead (HF_HUB_OFFLINE,
read when they are imported): the cache answers at once, and a missing model fails at once with
our one-line error saying which local path to pass.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
LOOKUP_TIMEOUT_S = 5.0  # a DNS server that does not answer at all would otherwise block for ~20 s


def needs_hub(cfg, command: str) -> bool:
    """True when the config names something only the hub has: a model that is not a local folder,
    or (train/pretrain/evaluate) a dataset with no local file or folder."""
    if not Path(cfg.model_name_or_path).is_dir():
        return True
    return command in ("train", "pretrain", "evaluate") and not (cfg.train_file or cfg.test_file or cfg.data_dir)


def host_resolves(host: str, timeout: float = LOOKUP_TIMEOUT_S) -> bool:
    """True if `host` has an address (a DNS lookup, no connection), within `timeout` seconds."""
    found: list[bool] = []

    def lookup() -> None:
        try:
            found.append(bool(socket.getaddrinfo(host, 443)))
        except (OSError, UnicodeError):
            found.append(False)

    thread = threading.Thread(target=lookup, daemon=True)  # getaddrinfo itself takes no timeout
    thread.start()
    thread.join(timeout)
    return bool(found and found[0])


def hub_host() -> str:
    """The host the Hugging Face libraries download from (HF_ENDPOINT, else huggingface.co)."""
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def chosen_outside() -> tuple[str, str] | None:
    """("offline", variable) when the user set offline mode, ("proxy", variable) when a proxy resolves names
    for us (a local lookup then says nothing), else None: the lookup decides."""
    offline = next((v for v in OFFLINE_VARS if os.environ.get(v)), "")
    proxy = next((v for v in PROXY_VARS if os.environ.get(v)), "")
    return ("offline", offline) if offline else ("proxy", proxy) if proxy else None


def offline_if_unreachable(cfg, command: str) -> str:
    """Set HF_HUB_OFFLINE=1 when the config needs the hub and its host does not resolve; returns the
    line saying so, or "" when nothing was decided (the user chose already, a proxy may reach the hub,
    nothing needs the hub, or it resolves)."""
    if chosen_outside() or not needs_hub(cfg, command):
        return ""
    host = hub_host()
    if host_resolves(host):
        return ""
    os.environ["HF_HUB_OFFLINE"] = "1"
    return (f"hub: {host} does not resolve: offline mode, so only local folders and the Hugging Face "
            "cache are used (HF_HUB_OFFLINE=1)")
