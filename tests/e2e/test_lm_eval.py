"""lm-evaluation-harness (`lm_eval`, its CLI as its users run it) against a real node with authentication on.

Two of its model types: `local-completions` scores the answers of a multiple-choice task by their log
likelihood (/v1/completions with `echo` and `logprobs`), and `local-chat-completions` answers a
generate-until task (/v1/chat/completions). The tasks and their data are local files (tests/data/lm_eval);
nothing may reach a hub: the Hugging Face libraries run offline and every proxy is a closed port, so a
download fails the test rather than passing on a machine with a network.

lm-eval needs a tokenizer of its own for log likelihoods (it counts the context's tokens to know which of
the echoed scores are the answer's). A node serves GGUF models, so the test does what a user would:
transformers converts the GGUF's own tokenizer into a local tokenizer folder, passed as `tokenizer=`.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, metric, running, tenant_headers

pytestmark = pytest.mark.e2e
MODEL = "tiny-llm"
TASKS = Path(__file__).parents[1] / "data" / "lm_eval"
TOKENIZER_FROM_GGUF = (
    "import sys; from pathlib import Path; from transformers import AutoTokenizer;"
    "gguf = Path(sys.argv[1]);"
    "AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(sys.argv[2])"
)


@pytest.fixture(scope="module")
def node(node_home: Path) -> Iterator[NodeProcess]:
    with running(NodeProcess(node_home, env=LLM_ENV, auth=True)) as process:
        yield process


@pytest.fixture(scope="module")
def key(node_home: Path) -> str:
    """A user's API key (not an operator's): what an evaluation is given."""
    return tenant_headers(node_home, "evals")["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory, key: str) -> dict[str, str]:
    """The environment of every lm-eval and transformers process: offline, caches in a fresh folder."""
    root = tmp_path_factory.mktemp("hf")
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    proxies = {"http_proxy": closed, "https_proxy": closed, "no_proxy": "127.0.0.1"}
    return {
        **os.environ,
        **proxies,
        **{name.upper(): value for name, value in proxies.items()},  # clients read either spelling
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "home"),
        "HF_DATASETS_CACHE": str(root / "datasets"),
        "OPENAI_API_KEY": key,  # local-completions sends it as `Authorization: Bearer …`
    }


@pytest.fixture(scope="module")
def client(node: NodeProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key=key, max_retries=0)


def lm_eval(
    out: Path, env: dict[str, str], model: str, model_args: str, *flags: str
) -> subprocess.Popen[bytes]:
    """Start the CLI on one of our tasks, from the tasks' folder (their data paths are relative to it)."""
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, *flags]
    command += ["--include_path", str(TASKS), "--output_path", str(out), "--log_samples"]
    out.mkdir()
    with (out / "stderr.txt").open("wb") as log:
        return subprocess.Popen(command, cwd=TASKS, env=env, stdout=subprocess.DEVNULL, stderr=log)


def finished(process: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    """Its results file once it exits, with its samples (one per document) under "samples"."""
    process.wait(180)
    assert process.returncode == 0, (out / "stderr.txt").read_text()[-4000:]
    (results,) = out.glob("*/results_*.json")
    (samples,) = out.glob("*/samples_*.jsonl")
    return {
        **json.loads(results.read_text()),
        "samples": [json.loads(s) for s in samples.read_text().splitlines()],
    }


def stop(process: subprocess.Popen[bytes]) -> None:
    process.kill()
    process.wait()


ROUTES = {
    "edgegen_choice": 'edgegen_responses_total{route="/v1/completions",status="200"}',
    "edgegen_answer": 'edgegen_responses_total{route="/v1/chat/completions",status="200"}',
}


@pytest.fixture(scope="module")
def runs(
    node: NodeProcess, node_home: Path, offline: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """Both evaluations, by task, each with the count of requests the node answered for it ("requests").
    They run at once: each start of the CLI first reads all of lm-eval's own task files (seconds of CPU)."""
    root = tmp_path_factory.mktemp("lm_eval")
    before = {task: metric(node, route) for task, route in ROUTES.items()}
    with contextlib.ExitStack() as started:
        chat_args = f"model={MODEL},base_url={node.url}/v1/chat/completions,max_retries=1"
        chat_flags = ("--apply_chat_template", "--tasks", "edgegen_answer")
        chat = lm_eval(root / "chat", offline, "local-chat-completions", chat_args, *chat_flags)
        started.callback(stop, chat)
        tokenizer = root / "tokenizer"
        subprocess.run(
            [sys.executable, "-c", TOKENIZER_FROM_GGUF, str(node_home / "tiny.gguf"), str(tokenizer)],
            env=offline,
            check=True,
            timeout=120,
        )
        args = f"model={MODEL},base_url={node.url}/v1/completions,tokenizer_backend=huggingface,"
        args += f"tokenizer={tokenizer},tokenized_requests=False,max_retries=1"
        scores = lm_eval(root / "scores", offline, "local-completions", args, "--tasks", "edgegen_choice")
        started.callback(stop, scores)
        done = {
            "edgegen_answer": finished(chat, root / "chat"),
            "edgegen_choice": finished(scores, root / "scores"),
        }
    for task, route in ROUTES.items():
        done[task]["requests"] = metric(node, route) - before[task]
    return done


def test_local_completions_scores_answers_with_the_nodes_log_probabilities(
    runs: dict[str, dict[str, Any]], client: openai.OpenAI
) -> None:
    run = runs["edgegen_choice"]
    samples = run["samples"]
    assert len(samples) == 4
    assert run["requests"] == 16  # one request per (question, answer)
    # Each answer's score lm-eval reports is the sum of the node's own log probabilities of the answer's
    # tokens (the prompt scored alone, asked here with the openai client)...
    right = []
    for sample in samples:
        scores = []
        for request, response in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context, answer = request["arg_0"], request["arg_1"]
            choice = client.completions.create(
                model=MODEL, prompt=context + answer, max_tokens=0, logprobs=0, echo=True
            ).choices[0]
            assert choice.logprobs is not None
            offsets, logprobs = choice.logprobs.text_offset or [], choice.logprobs.token_logprobs or []
            own = sum(lp for at, lp in zip(offsets, logprobs, strict=True) if at >= len(context))
            assert float(response[0][0]) == pytest.approx(own, abs=1e-4)
            scores.append(own)
        right.append(int(np.argmax(scores)) == sample["doc"]["answer"])
    # ...and its accuracy is the share of questions whose best-scored answer is the right one.
    results = run["results"]["edgegen_choice"]
    assert results["acc,none"] == pytest.approx(np.mean(right))
    assert 0 <= results["acc_norm,none"] <= 1


def test_local_chat_completions_answers_a_generate_until_task(
    runs: dict[str, dict[str, Any]], client: openai.OpenAI
) -> None:
    run = runs["edgegen_answer"]
    assert len(run["samples"]) == 3
    assert run["requests"] == 3
    assert 0 <= run["results"]["edgegen_answer"]["exact_match,none"] <= 1
    # What lm-eval reports as the answer is what the node answers the same chat (greedy, so the same).
    for sample in run["samples"]:
        (request,) = sample["arguments"].values()
        messages, options = json.loads(request["arg_0"][0]), request["arg_1"]
        answer = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=options["max_gen_toks"],
            temperature=0,
            stop=options["until"],
        )
        assert sample["resps"] == [[answer.choices[0].message.content]]
