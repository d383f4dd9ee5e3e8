"""What each part of the gateway's relay costs a prediction, in process (issue 19, item 2).

A real node (`edgegen serve`, digits) in its own process; the gateway's ASGI app in this one, driven without
a server: 64 tasks each send `POST /predict` straight into the app and check that the answer is the node's
own for that body. CPU per request is this process's CPU time (the node's is not in it) over the requests,
so the HTTP server under the gateway (uvicorn, our cycle) is left out: that is `bench/gateway.py --floors`.

Variants, run in rounds A B C …, then … C B A (the same noise on each, and no variant always first), every
answer checked:

    gateway         the whole app: request boundary, security gate, proxy
    -metrics        without the proxy's and the boundary's metric updates
    -gate check     the gate's checks answered at once (authentication is off, as in bench/gateway.py)
    -access record  without the boundary's request observation and access line (off, as in bench/gateway.py)
    -headers        without building the node's request headers (a fixed list instead)
    proxy only      the proxy called directly: no boundary, no gate
    pool only       the upstream pool alone (gateway/upstream.py): send, read whole, answer

An ablation takes one part out by replacing its method on the instance for its rounds. Reports the median CPU
per request (min–max) and each variant's difference from the whole app. Not a product: a map of where the
relay's Python goes, beside the live figures of bench/gateway.py.

    python bench/relay_parts.py [--rounds 7] [--requests 6400]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console

from edgegen.gateway.app import Gateway
from edgegen.gateway.settings import GatewaySettings
from edgegen.security.auth import ANONYMOUS_ADMIN
from gateway import node
from predict import digits_workload
from servers import new_result, save_result, start, stop

console = Console()
CLIENTS = 64
BODY = b'{"input_data": [[' + b",".join([b"7.5"] * 64) + b"]]}"
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[Any]]


def scope() -> dict[str, Any]:
    """What uvicorn hands the app for one `POST /predict` from a local client."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(BODY))],
        "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8080), "state": {},
    }  # fmt: skip


async def one(app: App, expected: bytes) -> None:
    answer: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: Message) -> None:
        answer.append(message)

    await app(scope(), receive, send)
    status, body = answer[0]["status"], b"".join(m.get("body", b"") for m in answer[1:])
    if status != 200 or body != expected:
        raise RuntimeError(f"a wrong answer: {status} {body[:200]!r}")


async def cpu_per_request(app: App, requests: int, expected: bytes) -> float:
    async def client() -> None:
        for _ in range(requests // CLIENTS):
            await one(app, expected)

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return (time.process_time() - started) / requests * 1e6


@contextmanager
def without(patches: list[tuple[object, str, object]]) -> Iterator[None]:
    for target, name, replacement in patches:
        setattr(target, name, replacement)
    try:
        yield
    finally:
        for target, name, _ in patches:
            delattr(target, name)


def _nothing(*args: object, **kwargs: object) -> None:
    return None


async def measure(node_url: str, rounds: int, requests: int) -> dict[str, list[float]]:
    settings = GatewaySettings.model_validate(
        {"nodes": [{"url": node_url}], "access_log": False, "security": {"auth": False}}
    )  # (as bench/gateway.py runs it)
    app = Gateway(settings)
    boundary, proxy = app.entry, app.proxy
    gate = boundary.app
    pool = proxy.pool(proxy.fleet.available()[0])

    async def proxy_only(s: dict[str, Any], receive: Receive, send: Send) -> None:
        await proxy(s, receive, send, "bench")

    async def pool_only(s: dict[str, Any], receive: Receive, send: Send) -> None:
        body = (await receive())["body"]
        response = await pool.request(b"POST", b"/predict", [(b"content-type", b"application/json")], body)
        data = await response.read()
        response.release()
        await send({"type": "http.response.start", "status": response.status, "headers": response.headers})
        await send({"type": "http.response.body", "body": data})

    fixed_headers = ([(b"content-type", b"application/json")], None)
    variants: dict[str, tuple[App, list[tuple[object, str, object]]]] = {
        "gateway": (app, []),
        "-metrics": (
            app,
            [(proxy.observer, "attempt", _nothing), (boundary.observer, "observe_request", _nothing)],
        ),
        "-gate check": (app, [(gate, "_check", lambda *_: ANONYMOUS_ADMIN)]),
        "-access record": (app, [(boundary, "_record", _nothing)]),
        "-headers": (app, [(proxy, "_forward_headers", lambda *_, **__: fixed_headers)]),
        "proxy only": (proxy_only, []),
        "pool only": (pool_only, []),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    async with app.lifespan():
        response = await pool.request(b"POST", b"/predict", [(b"content-type", b"application/json")], BODY)
        expected = await response.read()
        response.release()
        await cpu_per_request(app, 640, expected)  # warm: connections open, caches filled
        for number in range(rounds):
            order = list(variants.items())
            for name, (entry, patches) in order if number % 2 == 0 else reversed(order):
                with without(patches):
                    results[name].append(await cpu_per_request(entry, requests, expected))
            console.print(f"round {number}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in results.items()))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=6400)
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-relay-parts-") as tmp:
        root = Path(tmp)
        home, _, _ = digits_workload(root)
        server = node(home, "node")
        start(server, root)
        try:
            rows = uvloop.run(measure(server.base_url, args.rounds, args.requests))
        finally:
            stop(server)
    whole = statistics.median(rows["gateway"])
    result["cpu_us_per_request"] = {}
    console.print(
        "\n| variant | CPU µs per request, median (min–max) | against the whole app |\n|---|---|---|"
    )
    for name, values in rows.items():
        med = statistics.median(values)
        result["cpu_us_per_request"][name] = [med, min(values), max(values)]
        console.print(f"| {name} | {med:.1f} ({min(values):.1f}–{max(values):.1f}) | {med - whole:+.1f} |")
    console.print(f"results: {save_result('relay_parts', result)}")


if __name__ == "__main__":
    main()
