import subprocess
import sys
from pathlib import Path


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
