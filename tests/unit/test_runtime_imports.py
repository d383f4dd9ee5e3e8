import subprocess
import sys
from pathlib import Path

import pytest

from edgegen.executors import describe_model
from edgegen.store import ModelStore
from tests.llm_models import write_tiny_llama


def test_the_node_and_gateway_runtimes_import_no_training_framework() -> None:
    code = (
        "import sys, edgegen.cli, edgegen.node.app, edgegen.executors.onnx, edgegen.executors.tflite,"
        " edgegen.gateway.app;"
        "print(sorted(m for m in ('torch', 'sklearn', 'onnx', 'tensorflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_node_starts_without_the_http_clients_it_does_not_use(tmp_path: Path) -> None:
    # aiohttp (pulling a package by URL) and httpx (shipping logs) load when those are used, not at start.
    code = (
        "import sys; from pathlib import Path; from edgegen.config import Settings;"
        "from edgegen.node.app import create_app;"
        f"create_app(Settings(home=Path({str(tmp_path)!r}), store_poll_s=0));"
        "print(sorted(m for m in ('aiohttp', 'httpx') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


RUNTIMES = ("onnxruntime", "ai_edge_litert", "llama_cpp")
# A node over the store in `home`, started (its models loaded), then the runtimes it imported.
NODE_WITH_STORE = """
import sys, time
from pathlib import Path
from starlette.testclient import TestClient
from edgegen.config import Settings
from edgegen.node.app import create_app

with TestClient(create_app(Settings(home=Path({home!r}), store_poll_s=0))) as client:
    while client.get("/v2/health/ready").status_code != 200:
        time.sleep(0.02)
    print(sorted(m for m in {runtimes!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("formats", "loaded"),
    [
        ((), set()),
        (("onnx",), {"onnxruntime"}),
        (("tflite",), {"ai_edge_litert"}),
        (("gguf",), {"llama_cpp"}),
        (("onnx", "tflite"), {"onnxruntime", "ai_edge_litert"}),
    ],
)
def test_a_node_loads_the_runtimes_of_the_formats_it_serves_and_no_other(
    tmp_path: Path, model_files: dict[str, Path], formats: tuple[str, ...], loaded: set[str]
) -> None:
    store = ModelStore(tmp_path / "models", describe=describe_model)
    sources = {**model_files, "gguf": write_tiny_llama(tmp_path / "tiny.gguf")}
    for fmt in formats:
        store.add(sources[fmt], f"m-{fmt}")
    code = NODE_WITH_STORE.format(home=str(tmp_path), runtimes=RUNTIMES)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == str(sorted(loaded))
