from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edgegen.config import Settings
from edgegen.node.app import create_app
from edgegen.security.keys import KeyStore
from edgegen.store import ModelStore


def wait_ready(client: TestClient, timeout: float = 10) -> None:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if client.get("/v2/health/ready").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError("node did not become ready")


@pytest.fixture
def settings(tmp_path: Path, store: ModelStore) -> Settings:
    return Settings(home=tmp_path, store=store.root, store_poll_s=0, max_body_bytes=256 * 1024)


def admin_headers(settings: Settings) -> dict[str, str]:
    """An admin key made in the node's key store, as the header that carries it."""
    store = KeyStore(settings.keys_file)
    try:
        return {"Authorization": f"Bearer {store.create('admin')[0]}"}
    finally:
        store.close()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False, headers=admin_headers(settings)) as c:
        wait_ready(c)
        yield c
