"""The jobs API on a real node: answers equal the live route's, bad input is a clear 4xx, tenants do not
see each other's jobs, a queued job runs with its submitter's scope as it reads when the job runs, and a
node killed with SIGKILL mid-queue loses and repeats nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgegen.jobs.sqlite import SqliteJobQueue
from edgegen.security.keys import KeyStore
from tests.e2e.conftest import LLM_ENV
from tests.e2e.node_process import NodeProcess, metric, running, tenant_headers

CHAT = {
    "model": "tiny-llm",
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 6,
    "temperature": 0,
}


def predict(x: list[float]) -> dict[str, object]:
    """A job order for the seed's route."""
    return {"method": "POST", "url": "/predict", "body": {"input_data": x}}


async def counts(path: Path) -> dict[str, int]:
    queue = SqliteJobQueue(path)
    try:
        return await queue.counts()
    finally:
        await queue.close()


@pytest.fixture(scope="module")
def jobs_node(node_home: Path) -> Iterator[NodeProcess]:
    # No response cache: a job's answer must be computed, to compare with the live one (test_cache.py
    # shows jobs answered from the cache).
    env = {**LLM_ENV, "EDGEGEN_CACHE__ENABLED": "false"}
    with running(NodeProcess(node_home, env=env, auth=True)) as process:
        yield process


def wait_final(client: httpx.Client, job_id: str, timeout: float = 60) -> dict[str, object]:
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_a_job_answers_as_the_live_route(jobs_node: NodeProcess, node_home: Path) -> None:
    x = np.random.default_rng(3).uniform(0, 16, 64).round(2).tolist()
    with httpx.Client(
        base_url=jobs_node.url, headers=tenant_headers(node_home, "acme"), timeout=30
    ) as client:
        live_predict = client.post("/predict", json={"input_data": x}).json()
        live_chat = client.post("/v1/chat/completions", json=CHAT).json()
        submitted = client.post(
            "/v1/jobs", json={"method": "POST", "url": "/predict", "body": {"input_data": x}}
        )
        assert submitted.status_code == 202
        assert submitted.json()["status"] == "queued"
        chat = client.post("/v1/jobs", json={"method": "POST", "url": "/v1/chat/completions", "body": CHAT})
        done = wait_final(client, submitted.json()["id"])
        assert done["status"] == "succeeded"
        assert done["response"] == {"status_code": 200, "body": live_predict}
        missing = client.post("/v1/jobs", json={**predict(x), "url": "/models/nope/predict"})
        assert missing.status_code == 404  # a model that is not served is refused at submission
        long = {**CHAT, "messages": [{"role": "user", "content": "the fox " * 2100}]}
        order = {"method": "POST", "url": "/v1/chat/completions", "body": long}
        too_long = client.post("/v1/jobs", json=order)
        failed = wait_final(client, too_long.json()["id"])  # accepted, then answered as the live route would
        assert (failed["status"], failed["response"]["status_code"]) == ("failed", 400)  # type: ignore[index]
        chat_done = wait_final(client, chat.json()["id"])
        assert chat_done["response"]["body"]["choices"] == live_chat["choices"]  # type: ignore[index]


def test_job_metrics(jobs_node: NodeProcess, node_home: Path) -> None:
    runs = metric(jobs_node, 'edgegen_job_runs_total{outcome="finished"}')
    with httpx.Client(
        base_url=jobs_node.url, headers=tenant_headers(node_home, "acme"), timeout=30
    ) as client:
        job = client.post("/v1/jobs", json=predict([2.0] * 64)).json()
        wait_final(client, job["id"])
    assert metric(jobs_node, 'edgegen_job_runs_total{outcome="finished"}') == runs + 1
    assert metric(jobs_node, 'edgegen_jobs{status="succeeded"}') >= 1
    assert metric(jobs_node, 'edgegen_jobs{status="queued"}') == 0
    assert metric(jobs_node, "edgegen_job_run_duration_seconds_count") >= 1


def test_idempotency_keys(jobs_node: NodeProcess, node_home: Path) -> None:
    order = {"method": "POST", "url": "/predict", "body": {"input_data": [1.0] * 64}}
    with httpx.Client(
        base_url=jobs_node.url, headers=tenant_headers(node_home, "acme"), timeout=30
    ) as client:
        first = client.post("/v1/jobs", json=order, headers={"Idempotency-Key": "order-17"})
        again = client.post("/v1/jobs", json=order, headers={"Idempotency-Key": "order-17"})
        assert (first.status_code, again.status_code) == (202, 200)
        assert first.json()["id"] == again.json()["id"]
        other = client.post(
            "/v1/jobs", json={**order, "priority": 3}, headers={"Idempotency-Key": "order-17"}
        )
        assert other.status_code == 200  # priority is not part of the request: same job
        changed = {**order, "body": {"input_data": [2.0] * 64}}
        conflict = client.post("/v1/jobs", json=changed, headers={"Idempotency-Key": "order-17"})
        assert conflict.status_code == 409


@pytest.mark.parametrize(
    ("order", "status", "fragment"),
    [
        ({"method": "POST", "url": "/admin/models", "body": {}}, 400, "url"),
        ({"method": "GET", "url": "/predict", "body": {}}, 400, "method"),
        ({"method": "POST", "url": "/predict", "body": "text"}, 400, "body"),
        ({"method": "POST", "url": "/predict", "body": {}, "priority": 99}, 400, "priority"),
        ({"method": "POST", "url": "/v1/chat/completions", "body": {**CHAT, "stream": True}}, 400, "stream"),
        ({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}, 400, "model"),
        ({"method": "POST", "url": "/models/../predict", "body": {}}, 400, "url"),
        ({"method": "POST", "url": "/predict", "body": {}, "extra": 1}, 400, "extra"),
    ],
)
def test_bad_jobs_are_refused(
    jobs_node: NodeProcess, node_home: Path, order: dict[str, object], status: int, fragment: str
) -> None:
    with httpx.Client(
        base_url=jobs_node.url, headers=tenant_headers(node_home, "acme"), timeout=30
    ) as client:
        response = client.post("/v1/jobs", json=order)
        assert response.status_code == status, response.text
        assert fragment in response.text


def test_ids_tenants_and_sizes(jobs_node: NodeProcess, node_home: Path) -> None:
    acme, beta = tenant_headers(node_home, "acme"), tenant_headers(node_home, "beta")
    with httpx.Client(base_url=jobs_node.url, timeout=30) as client:
        job = client.post("/v1/jobs", headers=acme, json=predict([0.0] * 64)).json()
        assert client.get(f"/v1/jobs/{job['id']}", headers=beta).status_code == 404
        assert client.delete(f"/v1/jobs/{job['id']}", headers=beta).status_code == 404
        assert client.get("/v1/jobs/not-an-id", headers=acme).status_code == 400
        assert client.get(f"/v1/jobs/job_{'0' * 24}", headers=acme).status_code == 404
        assert client.get(f"/v1/jobs/{job['id']}").status_code == 401
        huge = {"method": "POST", "url": "/predict", "body": {"input_data": [0.0] * 3_000_000}}
        assert client.post("/v1/jobs", headers=acme, json=huge).status_code == 413
        assert client.get(f"/v1/jobs/{job['id']}", headers=acme).status_code == 200


def test_cancel_a_queued_job(node_home: Path, tmp_path: Path) -> None:
    env = {**LLM_ENV, "EDGEGEN_JOBS__WORKERS": "0", "EDGEGEN_JOBS__PATH": str(tmp_path / "jobs.sqlite")}
    idle = NodeProcess(node_home, env=env, auth=True)
    with (
        running(idle),
        httpx.Client(base_url=idle.url, headers=tenant_headers(node_home, "acme"), timeout=30) as client,
    ):
        job = client.post("/v1/jobs", json=predict([0.0] * 64)).json()
        cancelled = client.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def forward_passes(node: NodeProcess, model: str) -> float:
    """How many forward passes `model` made on `node` (its batch-size histogram's count)."""
    text = httpx.get(f"{node.url}/metrics", headers=node.headers).text
    prefix = f'edgegen_batch_size_count{{model="{model}"}} '
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_a_queued_job_runs_with_its_submitters_scope_as_it_is_then(node_home: Path, tmp_path: Path) -> None:
    """A key scoped to two models queues a job for each at a node that runs no jobs, and another key queues
    one too; then the operator narrows the first key to one model and revokes the other. A node that runs
    jobs refuses the job for the model the key lost and the revoked key's job — 403, as the live route
    answers — without running their model, and runs the job the key may still run."""
    keys = KeyStore(node_home / "security" / "keys.sqlite")
    try:
        scoped, narrowed = keys.create("user", models=("digits", "digits-tflite"), tenant="acme")
        doomed, revoked = keys.create("user", tenant="acme")
    finally:
        keys.close()
    env = {**LLM_ENV, "EDGEGEN_JOBS__PATH": str(tmp_path / "jobs.sqlite")}
    sample = {"input_data": [1.0] * 64}
    accepting = NodeProcess(node_home, env={**env, "EDGEGEN_JOBS__WORKERS": "0"}, auth=True)
    with running(accepting), httpx.Client(base_url=accepting.url, timeout=30) as client:

        def queue(url: str, token: str) -> str:
            order = {"method": "POST", "url": url, "body": sample}
            response = client.post("/v1/jobs", json=order, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        lost, kept = queue("/models/digits/predict", scoped), queue("/models/digits-tflite/predict", scoped)
        gone = queue("/predict", doomed)
    # No command narrows a key: the operator edits its record in the key store the gate reads.
    with contextlib.closing(sqlite3.connect(node_home / "security" / "keys.sqlite")) as db, db:
        db.execute("UPDATE keys SET models = 'digits-tflite' WHERE id = ?", (narrowed.id,))
    revoke = subprocess.run(
        [sys.executable, "-m", "edgegen", "keys", "revoke", revoked.id],
        env={**os.environ, "EDGEGEN_HOME": str(node_home)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert revoke.returncode == 0, revoke.stderr
    runner = NodeProcess(node_home, env=env, auth=True)
    with (
        running(runner),
        httpx.Client(base_url=runner.url, headers=tenant_headers(node_home, "acme"), timeout=30) as client,
    ):
        done = {job_id: wait_final(client, job_id) for job_id in (lost, kept, gone)}
        live = client.post(
            "/models/digits/predict", json=sample, headers={"Authorization": f"Bearer {scoped}"}
        )
        assert live.status_code == 403
        assert done[lost]["status"] == "failed"
        assert done[lost]["response"] == {"status_code": 403, "body": live.json()}
        assert done[kept]["status"] == "succeeded"
        assert done[gone]["status"] == "failed"
        assert done[gone]["response"]["status_code"] == 403  # type: ignore[index]
        assert "revoked" in done[gone]["response"]["body"]["error"]  # type: ignore[index]
        assert forward_passes(runner, "digits") == 0
        assert forward_passes(runner, "digits-tflite") == 1


def test_sigkill_mid_queue_loses_nothing_and_finishes_nothing_twice(node_home: Path, tmp_path: Path) -> None:
    """40 generation jobs (priority 9, slow) and 300 predictions (priority 0) accepted by a node that runs
    none (so the backlog does not depend on how fast this machine is), SIGKILLed; a second node runs them
    and is SIGKILLed while generations run; a third finishes: every job ends succeeded, once, with its
    own answer."""
    path = tmp_path / "jobs.sqlite"
    env = {
        **LLM_ENV,
        "EDGEGEN_JOBS__PATH": str(path),
        "EDGEGEN_JOBS__LEASE_S": "2",
        "EDGEGEN_JOBS__WORKERS": "4",
    }
    inputs = np.random.default_rng(7).uniform(0, 16, (300, 64)).round(3)
    chat = {**CHAT, "max_tokens": 48}
    headers = tenant_headers(node_home, "acme")
    accepting = NodeProcess(node_home, env={**env, "EDGEGEN_JOBS__WORKERS": "0"}, auth=True).start()
    try:
        with httpx.Client(base_url=accepting.url, headers=headers, timeout=30) as client:
            order = {"method": "POST", "url": "/v1/chat/completions", "body": chat, "priority": 9}
            chats = [client.post("/v1/jobs", json=order).json()["id"] for _ in range(40)]
            predictions = {client.post("/v1/jobs", json=predict(x.tolist())).json()["id"]: x for x in inputs}
    finally:
        accepting.kill()
    assert asyncio.run(counts(path))["queued"] == 340
    first = NodeProcess(node_home, env=env, auth=True, port=accepting.port).start()
    try:
        with httpx.Client(base_url=first.url, headers=headers, timeout=30) as client:
            until = time.monotonic() + 30
            while client.get(f"/v1/jobs/{chats[4]}").json()["status"] != "succeeded":
                assert time.monotonic() < until
                time.sleep(0.005)
    finally:
        first.kill()
    at_kill = asyncio.run(counts(path))
    assert at_kill["queued"] + at_kill["running"] > 0, at_kill  # the kill did land mid-queue
    assert at_kill["succeeded"] > 0, at_kill
    second = NodeProcess(node_home, env=env, auth=True, port=first.port)
    with running(second), httpx.Client(base_url=second.url, headers=headers, timeout=30) as client:
        live_chat = client.post("/v1/chat/completions", json=chat).json()["choices"]
        some = list(predictions)[:9]
        live = {i: client.post("/predict", json={"input_data": predictions[i].tolist()}).json() for i in some}
        jobs = {job_id: wait_final(client, job_id) for job_id in [*chats, *predictions]}
    assert [j["status"] for j in jobs.values()] == ["succeeded"] * 340
    for job_id in chats:
        assert jobs[job_id]["response"]["body"]["choices"] == live_chat  # type: ignore[index]
    for job_id in some:
        assert jobs[job_id]["response"]["body"] == live[job_id]  # type: ignore[index]
    assert max(int(j["attempts"]) for j in jobs.values()) <= 2  # type: ignore[call-overload]
