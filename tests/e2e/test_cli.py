"""The command line as `make serve` uses it: build the real default model, serve it, and clear errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sklearn.datasets import load_digits

from tests.e2e.node_process import NodeProcess

pytestmark = pytest.mark.e2e


def edgegen(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEGEN_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "edgegen", *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_pull_digits_builds_an_accurate_model_that_the_node_serves(tmp_path: Path) -> None:
    pulled = edgegen(tmp_path, "models", "pull", "digits")
    assert pulled.returncode == 0, pulled.stderr
    accuracy = float(re.search(r"added digits version 1, test accuracy ([0-9.]+)", pulled.stderr).group(1))
    assert accuracy >= 0.95
    again = edgegen(tmp_path, "models", "pull", "digits")
    assert "already in the store" in again.stderr  # cached: `make serve` does not retrain

    listing = edgegen(tmp_path, "models", "list").stdout
    assert "digits-tflite" in listing

    digits = load_digits()
    node = NodeProcess(tmp_path).start()
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
