"""A queued job runs as its submitter's credential reads when the job runs, not as it read at submission:
a real key store, narrowed, moved and revoked between the two, and a tiny ASGI app in place of the routes."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.types import Receive, Scope, Send

from edgegen.errors import Forbidden
from edgegen.jobs.queue import Job, JobRequest, Status
from edgegen.node.jobs import run_job, runs_as
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


class Routes:
    """The node's routes as a job meets them: whoever the scope says is calling gets a 200."""

    def __init__(self) -> None:
        self.callers: list[Any] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.callers.append(scope["edgegen.principal"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def test_a_refused_job_gets_the_live_routes_403_and_never_reaches_them(
    keys: KeyStore, edit_key: EditKey
) -> None:
    routes, principal = Routes(), submitted(keys, models=("digits",))
    assert await run_job(routes, keys, DEFAULT_MODEL, job(principal)) == (200, b"{}")
    assert routes.callers == [principal]
    edit_key(principal.key_id or "", "models", "digits-tflite")
    status, body = await run_job(routes, keys, DEFAULT_MODEL, job(principal))
    assert (status, orjson.loads(body)) == (403, {"error": "this credential may not use model 'digits'"})
    chat = orjson.dumps({"model": "digits", "prompt": "hi"})
    status, body = await run_job(routes, keys, DEFAULT_MODEL, job(principal, "/v1/completions", chat))
    assert status == 403
    assert orjson.loads(body)["error"]["type"] == "permission_error"  # OpenAI's shape under /v1/
    assert len(routes.callers) == 1
