"""A node serves models encrypted at rest, ONNX and GGUF alike, and refuses them clearly with a wrong key."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from edgegen.executors import describe_model, load_executor
from edgegen.security.atrest import Keyring, new_key
from edgegen.store import ModelStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, running
from tests.llm_models import write_tiny_llama


def test_a_node_serves_encrypted_models_and_refuses_them_with_a_wrong_key(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    keys = f"k1:{new_key()}"
    store = ModelStore(tmp_path / "models", keyring=Keyring.parse(keys), describe=describe_model)
    store.add(model_files["onnx"], "digits")
    gguf = write_tiny_llama(tmp_path / "tiny.gguf")
    store.add(gguf, "tiny-llm", task="text-generation")
    for model, plain in (("digits/1/model.onnx", model_files["onnx"]), ("tiny-llm/1/model.gguf", gguf)):
        on_disk = (tmp_path / "models" / model).read_bytes()
        assert on_disk.startswith(b"EGENC1")
        assert plain.read_bytes()[:256] not in on_disk

    env = {"EDGEGEN_ENCRYPTION_KEYS": keys, **LLM_ENV}
    with running(NodeProcess(tmp_path, env=env)) as node:
        x = np.random.default_rng(1).uniform(0, 16, (1, 64)).astype(np.float32)
        answer = httpx.post(f"{node.url}/predict", json={"input_data": x[0].tolist()}).json()["prediction"]
        want = load_executor(model_files["onnx"], "onnx").run({"input": x})["logits"]
        np.testing.assert_allclose(answer, want, rtol=1e-6)
        chat = {"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        assert httpx.post(f"{node.url}/v1/chat/completions", json=chat).status_code == 200

    wrong = NodeProcess(tmp_path, env={"EDGEGEN_ENCRYPTION_KEYS": f"k1:{new_key()}", **LLM_ENV})
    wrong.start(ready=False)
    try:
        until = time.monotonic() + 30
        while "model not loaded" not in wrong.log() and time.monotonic() < until:
            time.sleep(0.05)
        assert httpx.get(f"{wrong.url}/v2/health/ready").status_code == 503
        assert httpx.post(f"{wrong.url}/predict", json={"input_data": [0.0] * 64}).status_code == 404
        assert "decryption with key 'k1' failed: wrong key, or the data was changed" in wrong.log()
    finally:
        wrong.stop()
