"""Pytest fixtures of the download tests; test modules load them with `pytest_plugins = ["download_fixtures"]`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hub_server import HubServer


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs with HF_HUB_OFFLINE=1; these tests talk to 127.0.0.1 only, so lift it for them."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_ENABLE_HF_TRANSFER", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(online: None) -> Iterator[HubServer]:
    with HubServer() as server:
        yield server
