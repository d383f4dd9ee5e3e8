"""A node prompts a chat model with the chat as the model's own template writes it, and counts it so."""

from __future__ import annotations

from pathlib import Path

import jinja2
import openai
import pytest

from edgegen.config import LlmSettings
from edgegen.executors.llamacpp import LlamaExecutor
from tests.e2e.node_process import NodeProcess
from tests.llm_models import CHATML_TEMPLATE

pytestmark = pytest.mark.e2e


def test_a_chats_prompt_tokens_are_the_templates_rendering(node: NodeProcess, node_home: Path) -> None:
    messages = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"}]
    client = openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="tiny-llm", messages=messages, max_tokens=1)  # type: ignore[arg-type]
    # The template with transformers' options, its default system turn included, in plain jinja2.
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    executor = LlamaExecutor(node_home / "tiny.gguf", LlmSettings(max_num_seqs=1, ctx_per_seq=64, threads=1))
    try:
        expected = len(executor.tokenize(text, special=True))
    finally:
        executor.close()
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == expected
