"""The command line as `make serve` uses it: build the real default model, serve it, and clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sklearn.datasets import load_digits

from edgegen.modelkit import digits as digits_data
from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


# A node's environment, imitated in this one: importing a training framework, scikit-learn or the onnx
# package fails in every process started with it (sitecustomize runs first in each interpreter).
NODE_ONLY = """
import importlib.abc, importlib.machinery, sys

class _Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "sklearn", "onnx", "tensorflow", "scipy"}:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"{spec.name} is not installed on a node")

sys.meta_path.insert(0, _Absent())
"""


def edgegen(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEGEN_HOME": str(home), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "edgegen", *args], env=env, capture_output=True, text=True, timeout=300
    )


def node_only(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(NODE_ONLY)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}


def seed_data(home: Path) -> None:
    """The data file where a node keeps it after fetching scikit-learn's wheel (no download in tests)."""
    (home / "cache" / "wheels").mkdir(parents=True)
    sklearn_copy = digits_data._installed_copy()
    assert sklearn_copy is not None
    shutil.copy(sklearn_copy, home / "cache" / "wheels" / digits_data.DATA_FILE)


def test_pull_digits_builds_an_accurate_model_that_the_node_serves(tmp_path: Path) -> None:
    homes = [tmp_path / "a", tmp_path / "b"]
    files: list[dict[str, bytes]] = []
    for home in homes:  # two pulls without torch, scikit-learn or onnx: the same bytes
        seed_data(home)
        pulled = edgegen(home, "models", "pull", "digits", env=node_only(tmp_path))
        assert pulled.returncode == 0, pulled.stderr
        accuracy = float(
            re.search(r"added digits version 1, test accuracy ([0-9.]+)", pulled.stderr).group(1)
        )
        assert accuracy >= 0.97
        files.append({p.name: p.read_bytes() for p in sorted((home / "models").glob("digits*/1/model.*"))})
    assert sorted(files[0]) == ["model.onnx", "model.tflite"]
    assert files[0] == files[1]
    home = homes[0]
    again = edgegen(home, "models", "pull", "digits")
    assert "already in the store" in again.stderr  # cached: `make serve` does not retrain

    listing = edgegen(home, "models", "list").stdout
    assert "digits-tflite" in listing

    digits = load_digits()
    node = NodeProcess(home).start()
    try:
        for path in ("/predict", "/models/digits-tflite/predict"):
            hits = 0
            for start in range(0, 320, 32):  # 32 samples a request: the default max_batch_size
                batch = digits.data[start : start + 32].tolist()
                prediction = httpx.post(f"{node.url}{path}", json={"input_data": batch}).json()["prediction"]
                hits += sum(
                    row.index(max(row)) == t
                    for row, t in zip(prediction, digits.target[start:], strict=False)
                )
            assert hits >= 300
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "activate", "digits", "9"), "has no version"),
        (("models", "verify", "../etc"), "invalid model name"),
        (("models", "pull", "gpt-9"), "unknown model"),
        (("models", "add", "/nonexistent.onnx", "--name", "x"), "neither a model file"),
        (("serve", "--port", "99999"), "port"),
    ],
)
def test_errors_are_one_line_without_a_traceback(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    (tmp_path / "models" / "digits").mkdir(parents=True)
    result = edgegen(tmp_path, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
