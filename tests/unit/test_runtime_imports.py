import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def test_a_node_starts_without_the_clients_and_protocols_it_does_not_use(tmp_path: Path) -> None:
    # aiohttp (pulling a package by URL) loads when a pull needs it; httpx is no node dependency; grpc and
    # protobuf only with a `grpc_port`; nothing of OpenTelemetry but the API FastAPI itself imports (spans
    # leave through our own exporter, observe/otlp.py).
    unused = ("aiohttp", "httpx", "grpc", "google.protobuf", "opentelemetry.sdk", "opentelemetry.exporter",
              "opentelemetry.proto")  # fmt: skip
    code = (
        "import sys; from pathlib import Path; from edgegen.config import Settings;"
        "from edgegen.node.app import create_app;"
        f"create_app(Settings(home=Path({str(tmp_path)!r}), store_poll_s=0));"
        f"print(sorted(m for m in {unused!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


ROOT = Path(__file__).parents[2]
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


def node_install() -> set[str]:
    """The distributions `pip install 'edgegen[node]'` brings (normalized names): pyproject's dependencies
    and node extra, and what those require in turn, as installed here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    todo = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["node"]]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        wanted = {""} | requirement.extras
        for line in metadata.requires(requirement.name) or []:
            nested = Requirement(line)
            if nested.marker is None or any(nested.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(nested)
    return seen


def test_every_module_a_node_may_load_needs_only_what_the_node_extra_installs() -> None:
    # A module of the node's that imports a package only `make test` installs works in the tests and
    # fails on a node (the log shipper once imported httpx, a dev dependency): every module outside
    # `optimize` is imported here with every other top-level package made unimportable.
    installed = node_install()
    allowed = (
        {
            module
            for module, dists in metadata.packages_distributions().items()
            if any(canonicalize_name(d) in installed for d in dists)
        }
        | set(sys.stdlib_module_names)
        | {"edgegen", "_distutils_hack", "sitecustomize"}
    )
    code = ONLY_NODE_PACKAGES.format(allowed=sorted(allowed))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) > 100  # modules imported


ONLY_NODE_PACKAGES = """
import importlib, importlib.abc, pkgutil, sys

ALLOWED = set({allowed!r})

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in ALLOWED and not name.startswith("_"):
            raise ModuleNotFoundError(f"{{name}} is not installed with edgegen[node]", name=name)
        return None

sys.meta_path.insert(0, Absent())
import edgegen
count = 0
for module in pkgutil.walk_packages(edgegen.__path__, "edgegen."):
    if module.name.startswith("edgegen.optimize") or module.name.endswith("__main__"):
        continue
    importlib.import_module(module.name)
    count += 1
print(count)
"""
