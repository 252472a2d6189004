"""Hub names offline: fail in seconds, not after a minute of retries.

``transformers`` and ``datasets`` retry an unreachable hub for about a minute before they give up. Before a hub name
is loaded, ``offline_kwargs`` asks once per process whether the hub answers (one TCP connection, 3 s at most):
online, nothing changes; offline (or ``HF_HUB_OFFLINE=1``) with the files in the local cache, they are loaded from
it (``local_files_only``); offline without them, one clear error at once.
"""

from __future__ import annotations

import functools
import os
import re
import socket
from typing import Any
from urllib.parse import urlparse

from sstoken_pl.errors import ConfigError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name": what the hub takes


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection; False under
    ``HF_HUB_OFFLINE=1``."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_cached(name: str, kind: str = "model") -> bool:
    """Whether hub repo ``name`` has files in the local Hugging Face cache (a model's or tokenizer's config, or a
    dataset)."""
    try:
        from huggingface_hub import scan_cache_dir
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        return False
    try:
        return any(r.repo_id == name and r.repo_type == kind for r in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache directory yet, or an unreadable one
        return False


def offline_kwargs(name: str, what: str, kind: str = "model") -> dict[str, Any]:
    """``{}`` when ``name`` is a local path or the hub answers; ``{"local_files_only": True}`` offline with ``name``
    in the cache; else ``ConfigError`` naming ``what`` (e.g. ``model.model_name_or_path``)."""
    if not _HUB_ID.fullmatch(name) or os.path.exists(os.path.expanduser(name)) or hub_reachable():
        return {}  # a path (existing or not: the loader's own error names it), or the hub answers
    if is_cached(name, kind):
        return {"local_files_only": True}
    raise ConfigError(
        f"{what}: {name!r} is not a local path, and the Hugging Face hub cannot be reached (offline, or "
        f"HF_HUB_OFFLINE=1) with no copy in the local cache; give a local folder, or run once with network access"
    )
