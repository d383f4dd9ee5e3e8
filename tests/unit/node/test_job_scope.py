"""A queued job runs as its submitter's credential reads when the job runs, not as it read at submission:
a real key store, narrowed, moved and revoked between the two, and a tiny ASGI app in place of the routes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from starlette.testclient import TestClient

from edgegen.config import Settings
from edgegen.errors import Forbidden
from edgegen.jobs.queue import Job, JobRequest, Status
from edgegen.node.jobs_api import run_job, runs_as
from edgegen.security.auth import Authenticator, Principal
from edgegen.security.keys import KeyStore

DEFAULT_MODEL = "digits"
PREDICT = b'{"input_data": [1, 2, 3]}'


EditKey = Callable[[str, str, str], None]


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    store = KeyStore(tmp_path / "keys.sqlite")
    yield store
    store.close()


@pytest.fixture
def edit_key(tmp_path: Path) -> EditKey:
    """What an operator does to a key's record in the key store (no command narrows or moves a key)."""

    def edit(key_id: str, column: str, value: str) -> None:
        with contextlib.closing(sqlite3.connect(tmp_path / "keys.sqlite")) as db, db:
            db.execute(f"UPDATE keys SET {column} = ? WHERE id = ?", (value, key_id))

    return edit


def submitted(keys: KeyStore, models: tuple[str, ...] | None = ("digits", "digits-tflite")) -> Principal:
    """The principal the gate found for a new key of tenant acme, as the jobs route keeps it."""
    token, _ = keys.create("user", models=models, tenant="acme")
    return Authenticator(keys, None).authenticate(token)


def job(principal: Principal | None, url: str = "/models/digits/predict", body: bytes = PREDICT) -> Job:
    return Job("job_" + "0" * 24, "acme", JobRequest("POST", url, body), 0, Status.RUNNING, 1, 0.0, 0.0,
               principal=principal)  # fmt: skip


def test_a_principal_record_keeps_the_key_id_and_a_header_never_does() -> None:
    keyed = Principal("key:ab12cd34", "user", ("digits",), "acme", key_id="ab12cd34")
    assert Principal.from_record(keyed.to_record()) == keyed
    assert Principal.from_header(keyed.to_record()) == Principal("key:ab12cd34", "user", ("digits",), "acme")
    for forged in (b"{", b"[]", b'{"sub":"x","role":"root","models":null,"tenant":null,"key":null}'):
        assert Principal.from_record(forged) is None


def test_a_key_runs_its_jobs_with_its_scope_of_now(keys: KeyStore, edit_key: EditKey) -> None:
    principal = submitted(keys)
    assert principal.key_id is not None
    assert runs_as(job(principal), keys, DEFAULT_MODEL) == principal
    edit_key(principal.key_id, "models", "digits-tflite")
    with pytest.raises(Forbidden, match="may not use model 'digits'"):
        runs_as(job(principal), keys, DEFAULT_MODEL)
    with pytest.raises(Forbidden, match="may not use model 'digits'"):
        runs_as(job(principal, "/predict"), keys, DEFAULT_MODEL)  # the node's default model
    chat = orjson.dumps({"model": "tiny-llm", "messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(Forbidden, match="may not use model 'tiny-llm'"):
        runs_as(job(principal, "/v1/chat/completions", chat), keys, DEFAULT_MODEL)
    now = runs_as(job(principal, "/models/digits-tflite/predict"), keys, DEFAULT_MODEL)
    assert now.models == ("digits-tflite",)


def test_a_revoked_or_moved_key_runs_none_of_its_jobs(keys: KeyStore, edit_key: EditKey) -> None:
    moved, revoked = submitted(keys), submitted(keys)
    edit_key(moved.key_id or "", "tenant", "beta")
    with pytest.raises(Forbidden, match="another tenant"):
        runs_as(job(moved), keys, DEFAULT_MODEL)
    keys.revoke(revoked.key_id or "")
    with pytest.raises(Forbidden, match="revoked"):
        runs_as(job(revoked), keys, DEFAULT_MODEL)
    with pytest.raises(Forbidden, match="revoked"):
        runs_as(job(submitted(keys)), None, DEFAULT_MODEL)  # authentication is off now: no key to find


def test_other_credentials_keep_the_scope_they_were_checked_with(keys: KeyStore) -> None:
    vouched = Principal("key:ab12cd34", "user", ("digits-tflite",), "acme")  # a gateway's key, not ours
    assert runs_as(job(vouched, "/models/digits-tflite/predict"), keys, DEFAULT_MODEL) == vouched
    with pytest.raises(Forbidden, match="may not use model 'digits'"):
        runs_as(job(vouched), keys, DEFAULT_MODEL)
    with pytest.raises(Forbidden, match="queued before"):
        runs_as(job(None), keys, DEFAULT_MODEL)


def forward_passes(client: TestClient, model: str) -> float:
    """The forward passes `model` has run, from the node's own metrics."""
    value = client.app.state.node.metrics.registry.get_sample_value(
        "edgegen_batch_size_count", {"model": model}
    )
    return float(value or 0.0)


def test_a_job_runs_through_the_service_and_a_refused_one_never_reaches_the_model(
    client: TestClient, settings: Settings, keys: KeyStore, edit_key: EditKey
) -> None:
    service = client.app.state.node.service
    principal = submitted(keys, models=("digits",))
    pixels = orjson.dumps({"input_data": [1.0] * 64})
    status, body = client.portal.call(run_job, service, keys, settings, job(principal, body=pixels))
    live = client.post("/models/digits/predict", content=pixels)
    assert (status, orjson.loads(body)) == (200, live.json())  # the live route's answer, for this request
    passes = forward_passes(client, "digits")
    edit_key(principal.key_id or "", "models", "digits-tflite")
    status, body = client.portal.call(run_job, service, keys, settings, job(principal, body=pixels))
    assert (status, orjson.loads(body)) == (403, {"error": "this credential may not use model 'digits'"})
    chat = orjson.dumps({"model": "digits", "prompt": "hi"})
    status, body = client.portal.call(
        run_job, service, keys, settings, job(principal, "/v1/completions", chat)
    )
    assert status == 403
    assert orjson.loads(body)["error"]["type"] == "permission_error"  # OpenAI's shape under /v1/
    assert forward_passes(client, "digits") == passes
    status, body = client.portal.call(
        run_job, service, keys, settings, job(submitted(keys), body=b'{"input_data": [1, 2]}')
    )
    assert status == 400  # a body the route refuses, refused alike
    assert "error" in orjson.loads(body)
