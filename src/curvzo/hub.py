"""Whether the Hugging Face Hub can be reached, asked once with a short timeout.

Without a network the hub clients retry for about half a minute before they give up. One TCP
connection to the hub's endpoint, with a timeout of a few seconds, tells the same thing at once,
so a data set or model that needs the hub fails fast with a line that says what to do instead.
``HF_HUB_OFFLINE=1`` skips the probe: the clients then read only their local cache, which is
quick, and a proxy setting skips it too (the probe cannot see through a proxy).
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

__all__ = ["hub_unreachable", "PROBE_TIMEOUT_S"]

#: Seconds the probe waits for the hub's endpoint to accept a connection.
PROBE_TIMEOUT_S = 3.0

_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached (None when it can, or when the clients will not go online anyway)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return None
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    return _probe(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.cache
def _probe(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or endpoint, url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        return f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s ({reason})"
    return None
