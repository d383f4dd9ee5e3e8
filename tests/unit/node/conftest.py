from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from edgegen.config import Settings
from edgegen.node.app import create_app
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


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        wait_ready(c)
        yield c
