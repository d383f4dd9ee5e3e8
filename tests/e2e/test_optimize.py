"""`edgegen optimize` end to end on a small recipe: packages, report, refusals that leave nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from edgegen.executors import describe_model
from edgegen.optimize.engines import litert_runner, onnxruntime_runner
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess
from tests.llm_models import write_tiny_llama

pytestmark = pytest.mark.e2e

RECIPE = """
task = "digits"
latency_runs = 10
[teacher]
hidden = [96, 96]
epochs = 8
[[steps]]
kind = "distill"
hidden = [48, 48]
epochs = 8
[[steps]]
kind = "prune"
method = "neurons"
amount = 0.5
finetune_epochs = 3
[[steps]]
kind = "prune"
method = "l1"
amount = 0.5
scope = "global"
[[steps]]
kind = "lowrank"
rank = 8
[[steps]]
kind = "share"
clusters = 16
[[steps]]
kind = "quantize"
mode = "dynamic"
[[steps]]
kind = "quantize"
mode = "static"
calibration_samples = 64
[[steps]]
kind = "quantize"
mode = "qat"
epochs = 2
calibration_samples = 64
"""


def optimize(tmp_path: Path, recipe: str, out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "recipe.toml"
    path.write_text(recipe)
    env = {**os.environ, "EDGEGEN_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "edgegen", "optimize", str(path), "--out", str(out), *options]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_every_step_writes_a_measured_package_the_store_accepts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, RECIPE, out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    kinds = [s["step"] for s in report["steps"]]
    assert kinds == [
        "student-alone",
        "distill",
        "prune",
        "prune",
        "lowrank",
        "share",
        "int8-dynamic",
        "int8-static",
        "int8-qat",
    ]
    assert report["baseline"]["step"] == "teacher"
    assert report["baseline"]["params"] == 64 * 96 + 96 + 96 * 96 + 96 + 96 * 10 + 10
    by_index = {s["package"]: s for s in report["steps"]}
    assert by_index["02-prune"]["hidden_sizes"] == [24, 24]
    assert by_index["03-prune"]["nonzero_params"] < by_index["03-prune"]["params"]
    assert by_index["04-lowrank"]["ranks"][0] == 8
    # On a model this small, QDQ scales and zero points cost about what int8 saves; the digits example
    # (docs/optimization.md) shows the real ratio. Here: smaller than the teacher, and still accurate.
    assert by_index["07-int8-static"]["size_bytes"] < report["baseline"]["size_bytes"]
    assert by_index["08-int8-qat"]["epochs"] == 2
    # Every float step also has a LiteRT package of the same model, measured on LiteRT.
    for entry in report["steps"]:
        lite = entry.get("tflite")
        assert (lite is None) == entry["step"].startswith("int8")
        if lite:
            assert lite["package"] == entry["package"] + "-tflite"
            assert lite["max_abs_error"] < 1e-3
            assert lite["accuracy"] == entry["accuracy"]
            assert lite["latency_ms_p50"] > 0
    shared = by_index["05-share"]
    assert shared["clusters"] == 16
    assert shared["compressed_bytes"] < by_index["04-lowrank"]["compressed_bytes"]
    for entry in [report["baseline"], *report["steps"]]:
        assert 0.5 < entry["accuracy"] <= 1.0
        assert entry["latency_ms_p50"] > 0
        if not entry["step"].startswith("int8"):
            assert entry["max_abs_error"] < 1e-3  # the ONNX export computes what the layers compute
    assert "| 07-int8-static |" in (out / "report.md").read_text()
    assert "| 07-int8-static |" in result.stdout
    assert {e["engine"] for e in report["engines"] if e["status"] == "ok"} >= {
        "onnxruntime",
        "litert",
        "torch-eager",
    }
    assert "Fastest here:" in (out / "report.md").read_text()
    seed_table = (out / "report.md").read_text().split("## The seed's comparison table, measured")[1]
    for method in ("Knowledge distillation", "Pruning", "Low-rank factorization", "Parameter sharing"):
        assert f"| {method} |" in seed_table
    assert seed_table.count("| Quantization |") == 3
    for png in ("accuracy_vs_latency.png", "accuracy_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    store = ModelStore(tmp_path / "store", describe=describe_model)
    assert (out / "05-share-tflite" / "model.tflite").is_file()
    assert store.add(out / "05-share-tflite", "lite").format == "tflite"
    assert "| 05-share-tflite |" in (out / "report.md").read_text()
    for entry in report["steps"]:
        manifest = store.add(out / entry["package"], entry["package"].replace("_", "-"))
        model = store.open(manifest.name).model_path
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input": np.zeros((2, 64), np.float32)})[0]
        assert logits.shape == (2, 10)

    # A node serves the packages as they are: the int8 one as the default model, a LiteRT one beside it.
    home = tmp_path / "serving"
    served = ModelStore(home / "models", describe=describe_model)
    served.add(out / "07-int8-static", "digits")
    served.add(out / "05-share-tflite", "digits-lite")
    pixels = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)
    node = NodeProcess(home).start()
    try:
        for path, package, file in (
            ("/predict", "07-int8-static", "model.onnx"),
            ("/models/digits-lite/predict", "05-share-tflite", "model.tflite"),
        ):
            answer = httpx.post(f"{node.url}{path}", json={"input_data": pixels.tolist()}, timeout=10)
            assert answer.status_code == 200, answer.text
            run = (litert_runner if file.endswith("tflite") else onnxruntime_runner)(
                (out / package / file).read_bytes()
            )
            np.testing.assert_allclose(
                np.array(answer.json()["prediction"]), run(pixels), rtol=1e-5, atol=1e-5
            )
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("rank = 8", "rank = 500"), "exceeds"),
        (("amount = 0.5", "amount = 1.5"), "amount"),
        (('kind = "lowrank"', 'kind = "magic"'), "steps.3"),
    ],
)
def test_a_bad_recipe_fails_in_one_line_and_writes_nothing(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, RECIPE.replace(*change, 1), out)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_existing_output_directory_is_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = optimize(tmp_path, RECIPE, out)
    assert result.returncode == 1
    assert "already exists" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


LM_RECIPE = """
task = "lm"
base = "{base}"
[eval]
ctx = 64
chunks = 2
decode_tokens = 4
decode_runs = 1
[[steps]]
kind = "quantize"
type = "Q8_0"
[[steps]]
kind = "quantize"
type = "Q4_0"
[[steps]]
kind = "drop-layers"
count = 1
type = "Q8_0"
"""


def test_an_lm_recipe_writes_gguf_packages_a_node_serves(tmp_path: Path) -> None:
    base = write_tiny_llama(tmp_path / "tiny.gguf", n_layer=4)
    out = tmp_path / "out"
    result = optimize(tmp_path, LM_RECIPE.format(base=base), out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    reference, (q8, q4, cut) = report["baseline"], report["steps"]
    assert (reference["package"], reference["type"], reference["source_type"]) == (
        "00-reference-f16",
        "F16",
        "F32",
    )
    assert [s["package"] for s in report["steps"]] == ["01-q8_0", "02-q4_0", "03-drop1-q8_0"]
    assert q4["size_bytes"] < q8["size_bytes"] < reference["size_bytes"]
    assert q8["size_ratio"] > 1.5
    assert q4["size_ratio"] > q8["size_ratio"]
    for row in (reference, q8, q4, cut):
        assert 1 < row["perplexity"] < 10_000
        assert row["latency_ms_min"] <= row["latency_ms_p50"] <= row["latency_ms_max"]
        assert row["tokens_per_s"] > 0
    # Fewer bits move the perplexity; the reference is where every delta is measured from.
    assert q8["perplexity_delta_pct"] == pytest.approx(
        100 * (q8["perplexity"] / reference["perplexity"] - 1), abs=0.01
    )
    # The cut drops the block whose removal alone cost least.
    scan = report["sensitivity"]
    assert [s["layer"] for s in scan] == [0, 1, 2, 3]
    assert cut["dropped"] == [min(scan, key=lambda s: s["delta"])["layer"]]
    assert cut["n_layers"] == 3
    assert cut["params"] < q8["params"]
    markdown = (out / "report.md").read_text()
    assert "| 03-drop1-q8_0 | Q8_0 | 3 |" in markdown
    assert "Depth sensitivity" in markdown
    for png in ("perplexity_vs_latency.png", "perplexity_vs_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / ".work").exists()

    home = tmp_path / "home"
    store = ModelStore(home / "models", describe=describe_model)
    for entry in report["steps"]:
        store.add(out / entry["package"], f"lm-{entry['package'].replace('_', '-')}", task="text-generation")
    node = NodeProcess(home, env=LLM_ENV).start()
    try:
        for entry in report["steps"]:
            name = f"lm-{entry['package'].replace('_', '-')}"
            answer = httpx.post(
                f"{node.url}/v1/completions",
                json={"model": name, "prompt": "def main", "max_tokens": 4, "temperature": 0},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 4
    finally:
        node.stop()


@pytest.mark.parametrize(
    ("base", "change", "message"),
    [
        ("missing.gguf", None, "neither a pullable model"),
        ("junk.gguf", None, "GGUF"),
        ("tiny.gguf", ("count = 1", "layers = [7]"), "blocks 0..3"),
        ("tiny.gguf", ("count = 1", "count = 4"), "count must be below the 4 blocks"),
    ],
)
def test_a_bad_lm_recipe_fails_in_one_line_and_writes_nothing(
    tmp_path: Path, base: str, change: tuple[str, str] | None, message: str
) -> None:
    write_tiny_llama(tmp_path / "tiny.gguf", n_layer=4)
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all" * 10)
    recipe = LM_RECIPE.format(base=tmp_path / base)
    out = tmp_path / "out"
    result = optimize(tmp_path, recipe.replace(*change) if change else recipe, out)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


TIE_RECIPE = """
task = "digits"
latency_runs = 10
[teacher]
hidden = [48, 48, 48]
epochs = 8
[[steps]]
kind = "share"
method = "tie"
finetune_epochs = 4
[[steps]]
kind = "quantize"
mode = "static"
calibration_samples = 64
"""


def test_tied_layers_are_stored_once_and_quantize(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, TIE_RECIPE, out)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    teacher, (tied, int8) = report["baseline"], report["steps"]
    assert tied["tied"] == [[1, 2]]
    assert teacher["params"] - tied["params"] == 48 * 48
    assert teacher["size_bytes"] - tied["size_bytes"] > 48 * 48 * 4 * 0.9
    assert tied["max_abs_error"] < 1e-3
    assert tied["accuracy"] > 0.8
    assert int8["size_bytes"] < tied["size_bytes"]
    assert int8["accuracy"] > 0.8


def test_a_model_without_same_shaped_layers_cannot_be_tied(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, TIE_RECIPE.replace("[48, 48, 48]", "[48, 24]"), out)
    assert result.returncode == 1
    assert "no two layers have the same shape" in result.stderr
    assert not out.exists()


BUDGET_RECIPE = """
task = "digits"
latency_runs = 10
engines = false
[teacher]
hidden = [96, 96]
epochs = 8
[[steps]]
kind = "distill"
hidden = [48, 48]
epochs = 8
[[steps]]
kind = "prune"
method = "neurons"
amount = 0.5
finetune_epochs = 2
[[steps]]
kind = "quantize"
mode = "dynamic"
"""


def test_budget_mode_keeps_the_fastest_package_within_the_drop(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, BUDGET_RECIPE, out, "--max-accuracy-drop", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    found = report["budget"]
    teacher = report["baseline"]["accuracy"]
    assert found["accuracy_floor"] == pytest.approx(teacher - 0.02, abs=1e-4)
    # start (teacher, distilled) × prune (skip, 0.25, 0.5, 0.75) × (float, int8-dynamic)
    assert len(found["candidates"]) == 2 * 4 * 2
    assert {c["candidate"].split(" → ")[0] for c in found["candidates"]} == {"teacher", "distill"}
    for c in found["candidates"]:
        assert c["within"] == (c["accuracy"] >= found["accuracy_floor"] - 1e-9)
    chosen = found["chosen"]
    assert chosen["within"]
    assert chosen["latency_ms_p50"] == min(c["latency_ms_p50"] for c in found["candidates"] if c["within"])
    # The sensitivity of the distilled student: three layers; the last has no neurons to prune.
    assert [row["layer"] for row in found["sensitivity"]] == [0, 1, 2]
    assert "prune_drop" not in found["sensitivity"][2]
    assert all("int8_drop" in row for row in found["sensitivity"])
    assert "Budget search" in (out / "report.md").read_text()
    store = ModelStore(tmp_path / "store", describe=describe_model)
    store.add(out / "budget", "digits-budget")
    session = ort.InferenceSession(
        str(store.open("digits-budget").model_path), providers=["CPUExecutionProvider"]
    )
    assert session.run(None, {"input": np.zeros((3, 64), np.float32)})[0].shape == (3, 10)


@pytest.mark.parametrize(
    ("recipe", "drop", "message"), [(BUDGET_RECIPE, "-1", "in [0, 100)"), (LM_RECIPE, "1", "digits task")]
)
def test_budget_mode_refuses_what_it_cannot_do(tmp_path: Path, recipe: str, drop: str, message: str) -> None:
    out = tmp_path / "out"
    result = optimize(tmp_path, recipe.format(base=tmp_path / "tiny.gguf"), out, "--max-accuracy-drop", drop)
    assert result.returncode == 1
    assert message in result.stderr
    assert not out.exists()
