"""An operator's client for the gateway's JSON routes, as the `edgegen` command calls them.

    gateway = GatewayClient("https://gw.example:8080", key="eg_…", ca=Path("ca.crt"))
    lines = gateway.get("/gateway/logs", level="error", node=None)      # None parameters are left out
    answer = gateway.call("POST", "/gateway/rollback", {"model": "digits", "version": None})
    with archive.open("rb") as data:
        answer = gateway.upload("/gateway/models/digits/rollout", data, version="7")

Every failure is one EdgegenError whose message an operator can act on: the gateway's status and the start
of its answer, or why it could not be reached. The message carries what the gateway sent; the command
shows it through `edgegen.terminal`, so nothing it says can drive the terminal. The standard library's
urllib, not httpx: the command starts in a fraction of a second, and one blocking call at a time is all
it makes.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO

from edgegen.errors import EdgegenError

# A rollout or an upgrade answers once every node has been through it, health gate included.
TIMEOUT_S = 600.0


class GatewayClient:
    """A gateway's base URL, the bearer key sent with every call, and the CA an https:// one is checked
    against (the system's when None)."""

    def __init__(self, url: str, key: str | None = None, ca: Path | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise EdgegenError("--gateway must be an http:// or https:// URL")
        self.url = url
        self.key = key
        self.ca = ca

    def get(self, path: str, **params: Any) -> Any:
        """GET a route's JSON answer; `params` (None left out) become the query."""
        return self.call("GET", path, **params)

    def call(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        """Send `body` as JSON (none when None) and return the JSON answer."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        return self._send(method, path, data, headers, params)

    def upload(
        self, path: str, data: bytes | BinaryIO, headers: dict[str, str] | None = None, **params: Any
    ) -> Any:
        """POST raw bytes, or a file as it is read (never whole in memory), with `headers`; the JSON
        answer."""
        sent = {"Content-Type": "application/octet-stream", **(headers or {})}
        if not isinstance(data, bytes):
            sent["Content-Length"] = str(os.fstat(data.fileno()).st_size)
        return self._send("POST", path, data, sent, params)

    def _send(
        self,
        method: str,
        path: str,
        data: bytes | BinaryIO | None,
        headers: dict[str, str],
        params: dict[str, Any],
    ) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url.rstrip('/')}{path}" + (f"?{query}" if query else "")
        request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (scheme checked)
        if self.key:
            request.add_header("Authorization", f"Bearer {self.key}")
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as response:  # noqa: S310  # nosec B310
                return json.load(response)
        except urllib.error.HTTPError as exc:
            raise EdgegenError(
                f"the gateway answered {exc.code}: {exc.read()[:200].decode(errors='replace')}"
            ) from None
        except OSError as exc:
            raise EdgegenError(f"cannot reach the gateway at {self.url}: {exc}") from None
