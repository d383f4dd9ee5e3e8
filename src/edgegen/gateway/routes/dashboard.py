"""The fleet on one web page: a public page whose data (/gateway/fleet, …) needs an operator key.

    GET /dashboard                      the page
    GET /dashboard/{app.js,app.css}     its script and style; nothing else is served from here

The files are read from the package once; a strict Content-Security-Policy lets the page load only its own
script and style and talk only to this gateway.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Response

from edgegen.errors import NotFound

DASHBOARD_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                   "css": "text/css; charset=utf-8"}  # fmt: skip
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
router = APIRouter()


@router.get("/dashboard")
def dashboard() -> Response:
    return dashboard_file("index.html")


@router.get("/dashboard/{name}")
def dashboard_asset(name: str) -> Response:
    if name not in ("app.js", "app.css"):
        raise NotFound("no such file")
    return dashboard_file(name)


@functools.cache
def _dashboard_bytes(name: str) -> bytes:
    return (resources.files("edgegen.gateway") / "dashboard" / name).read_bytes()


def dashboard_file(name: str) -> Response:
    media_type = DASHBOARD_TYPES[name.rsplit(".", 1)[1]]
    return Response(_dashboard_bytes(name), media_type=media_type, headers=DASHBOARD_HEADERS)
