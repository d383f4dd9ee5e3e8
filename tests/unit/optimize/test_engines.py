from __future__ import annotations

import numpy as np

from edgegen.optimize.engines import compare
from tests.conftest import make_layers


def test_every_engine_is_checked_against_the_reference_then_timed() -> None:
    x = np.random.default_rng(0).uniform(0, 16, (80, 64)).astype(np.float32)
    results = {e["engine"]: e for e in compare(make_layers((64, 32, 10)), x, runs=10)}
    assert set(results) == {"onnxruntime", "litert", "openvino", "torch-eager", "torch-compile"}
    for name in results:
        entry = results[name]
        assert entry["status"] == "ok", entry
        assert entry["max_abs_error"] < 1e-4
        assert entry["latency_ms_p50"] > 0
        assert entry["latency_ms_p50_batch64"] > 0
    # torch.compile (inductor) builds C++ kernels with the machine's gcc, which this project's machines have.
    assert results["torch-compile"]["status"] == "ok", results["torch-compile"]
