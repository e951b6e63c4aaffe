"""Without the hub, data and models that need it fail at once with a line that says what to do."""

from __future__ import annotations

import socket
import time

import pytest

from curvzo import hub
from curvzo.data import load_splits
from curvzo.errors import DataError, ModelError
from curvzo.models import load_model


@pytest.fixture
def endpoint(monkeypatch: pytest.MonkeyPatch):
    """Point the hub at an address of our choosing, with no offline flag or proxy in the way."""
    for name in ("HF_HUB_OFFLINE", *hub._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    hub._probe.cache_clear()

    def use(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)

    yield use
    hub._probe.cache_clear()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def test_data_from_an_unreachable_hub_fails_fast(endpoint):
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(DataError, match=r"task `sst2`: nyu-mll/glue/sst2 needs the Hugging Face hub, but 127\.0\.0\.1"):
        load_splits("sst2")
    assert time.monotonic() - start < hub.PROBE_TIMEOUT_S + 1


def test_a_hub_model_from_an_unreachable_hub_fails_fast(endpoint):
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(ModelError, match=r"'org/model' is neither a local folder nor a built-in alias .*HF_HUB_OFFLINE=1"):
        load_model("org/model")


def test_a_listening_hub_is_reachable(endpoint):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        endpoint(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_unreachable() is None


def test_offline_mode_leaves_the_cache_to_the_clients(endpoint, monkeypatch):
    endpoint(f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable() is None
