"""The settings files shipped for small devices: valid as start-up reads them, and a node serves with them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from edgegen.config import load_settings
from tests.conftest import fill_store
from tests.e2e.node_process import NodeProcess, running
from tests.llm_models import write_tiny_llama

pytestmark = pytest.mark.e2e
PROFILES = sorted((Path(__file__).parents[2] / "deploy" / "profiles").glob("*.toml"))


def test_profiles_are_shipped() -> None:
    assert "board-1gb" in [p.stem for p in PROFILES]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_a_node_serves_classifiers_and_concurrent_chats_under_the_profile(
    profile: Path, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    settings = load_settings(profile)
    store = fill_store(tmp_path / "models", model_files)
    tiny = write_tiny_llama(tmp_path / "tiny.gguf", n_embd=128, n_head=4, n_head_kv=2)
    store.add(tiny, "tiny-llm", task="text-generation")
    prompts = [f"the {word} sat on the mat" for word in ("cat", "dog", "bird", "fox", "cow", "owl")]
    with running(NodeProcess(tmp_path, "--config", str(profile))) as node:
        for path in ("/predict", "/models/digits-tflite/predict"):
            answer = httpx.post(f"{node.url}{path}", json={"input_data": [[1.0] * 64]})
            assert answer.status_code == 200, answer.text
        together = asyncio.run(chats(node.url, prompts))  # more than max_num_seqs: some wait their turn
        alone = [asyncio.run(chats(node.url, [p]))[0] for p in prompts[:2]]
    assert len(prompts) > settings.llm.max_num_seqs
    assert all(len(text) > 0 for text in together)
    assert together[:2] == alone


async def chats(url: str, prompts: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one(prompt: str) -> str:
            body = {
                "model": "tiny-llm",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 48,
                "temperature": 0,
            }
            answer = await client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200, answer.text
            return str(answer.json()["choices"][0]["message"]["content"])

        return list(await asyncio.gather(*(one(p) for p in prompts)))
