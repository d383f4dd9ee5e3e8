from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import fill_store
from tests.e2e.node_process import NodeProcess


@pytest.fixture(scope="module")
def node_home(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("home")
    fill_store(home / "models", model_files)
    return home


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    process = NodeProcess(node_home, env={"EDGEGEN_STORE_POLL_S": "0.2"}).start()
    try:
        yield process
    finally:
        process.stop()
