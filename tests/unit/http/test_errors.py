"""The error boundary: each edgegen error becomes {"error": ...} with its status, nothing leaks."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from edgegen.errors import (
    DeadlineExceeded,
    EdgegenError,
    ExecutorError,
    InvalidInput,
    InvalidName,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
)
from edgegen.http import errors


def client_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    errors.install(app)

    @app.get("/boom")
    async def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidInput("bad shape"), 400),
        (InvalidName("bad name"), 404),
        (ModelNotFound("no model"), 404),
        (PayloadTooLarge("too big"), 413),
        (Overloaded("busy", retry_after=2), 503),
        (DeadlineExceeded("late"), 504),
        (ExecutorError("failed"), 500),
        (EdgegenError("other"), 500),
    ],
)
def test_each_error_maps_to_its_status_and_message(exc: EdgegenError, status: int) -> None:
    response = client_raising(exc).get("/boom")
    assert response.status_code == status
    assert response.json() == {"error": exc.message}


def test_overloaded_says_when_to_retry() -> None:
    response = client_raising(Overloaded("busy", retry_after=2)).get("/boom")
    assert response.headers["retry-after"] == "2"


def test_unexpected_exceptions_are_a_bare_500_without_internals() -> None:
    response = client_raising(KeyError("/etc/secret/path")).get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error"}
