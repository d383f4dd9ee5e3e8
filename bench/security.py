"""What security costs: authentication + authorization + rate limiting on a node, mutual TLS behind a gateway.

auth  One home (digits), two nodes side by side: `auth-off` (security.auth = false) and `auth-on` (an API
      key in every request, rate limits switched on but set above what wrk can send, so every request
      pays for its buckets without being refused). wrk + bench/predict.lua, every answer checked, at
      concurrency 1 and 64, in rounds A B A B. Target: auth-on p50 ≤ 1.05 × auth-off p50, each level.
gate  In process: µs per request through the whole security gate (network list, ban check, both token
      buckets, scan patterns, role, a cached API key) in front of an ASGI app that answers at once, against
      the bare app — what the end-to-end `auth` comparison cannot show, since its auth-off node still
      runs the gate's other checks. Median of 5 × 20,000 requests.
mtls  The `auth-on` node again, and an HTTPS copy of it that wants client certificates of the fleet's CA;
      two gateways (both authenticating): `gw-plain` → the node over http, `gw-mtls` → the HTTPS node
      with its gateway certificate (connections kept alive). Concurrency 1 and 64, rounds A B A B.
      Target: gw-mtls p50 − gw-plain p50 ≤ 1 ms.

    python bench/security.py [--rounds 5] [--duration 5]

Results go to bench/results/security-<timestamp>.json, with a summary printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from edgegen.security.keys import KeyStore
from edgegen.security.pki import Pki
from predict import BIN, digits_workload, run_wrk
from servers import Server, clean_env, free_port, new_result, save_result, start, stop

console = Console()
LEVELS = (1, 64)
# High enough that wrk never meets them: the buckets are taken on every request, never empty.
UNLIMITED = {
    "EDGEGEN_SECURITY__RATE_PER_KEY": "1e9",
    "EDGEGEN_SECURITY__BURST_PER_KEY": "1000000000",
    "EDGEGEN_SECURITY__RATE_PER_CLIENT": "1e9",
    "EDGEGEN_SECURITY__BURST_PER_CLIENT": "1000000000",
}


def node(home: Path, name: str, auth: bool, tls: dict[str, str] | None = None) -> Server:
    port = free_port()
    command = [str(BIN / "edgegen"), "serve", "--port", str(port)]
    env = clean_env(
        EDGEGEN_HOME=str(home), EDGEGEN_SECURITY__AUTH=str(auth).lower(), EDGEGEN_ACCESS_LOG="false",
        EDGEGEN_CACHE__ENABLED="false",
    )  # fmt: skip
    env.update(UNLIMITED)
    env.update(tls or {})
    # bench/servers.py probes readiness over plain HTTP; the HTTPS node is known ready once the gateway
    # in front of it is (a gateway is ready when one of its nodes passed a health check).
    return Server(name, command, env, "/v2/health/ready" if not tls else "", port)


def gateway(root: Path, name: str, url: str, pki: Path | None) -> Server:
    port = free_port()
    config = root / f"{name}.toml"
    text = f'access_log = false\n[[nodes]]\nurl = "{url}"\n'
    if pki is not None:
        text += (f'[nodes_tls]\nca_file = "{pki / "ca.crt"}"\ncert_file = "{pki / "gw.crt"}"\n'
                 f'key_file = "{pki / "gw.key"}"\n')  # fmt: skip
    config.write_text(text)
    command = [str(BIN / "edgegen"), "gateway", "--config", str(config), "--port", str(port)]
    env = clean_env(EDGEGEN_GATEWAY_HOME=str(root / "home"))
    env.update({k.replace("EDGEGEN_", "EDGEGEN_GATEWAY_"): v for k, v in UNLIMITED.items()})
    return Server(name, command, env, "/v2/health/ready", port)


def measure(
    servers: list[Server], key: str, rounds: int, seconds: int, data: Path, wrk_bin: str, part: str
) -> list[dict[str, Any]]:
    rows = []
    for r in range(rounds):
        for concurrency in LEVELS:
            for server in servers:  # A B A B: each pair shares the same minutes of a noisy machine
                given = key if server.name != "auth-off" else ""
                run_wrk(wrk_bin, server, concurrency, 1, data, given)  # warm-up
                result = run_wrk(wrk_bin, server, concurrency, seconds, data, given)
                row = {"part": part, "round": r, "server": server.name, "concurrency": concurrency, **result}
                rows.append(row)
                errors = result["non_200"] + result["socket_errors"]
                console.print(
                    f"{part} round {r} c{concurrency} {server.name}: {result['correct_rps']:.0f} req/s, "
                    f"p50 {result['p50_us']} µs, p99 {result['p99_us']} µs, wrong {result['wrong']}, "
                    f"errors {errors}"
                )
    return rows


def gate_cost(keys_file: Path, key: str, requests: int = 20_000, repeats: int = 5) -> dict[str, float]:
    """Median µs per request: the bare app, the gate with auth off, the gate with an API key."""
    from prometheus_client import CollectorRegistry

    from edgegen.security.auth import Authenticator
    from edgegen.security.gate import SecurityGate, SecurityMetrics
    from edgegen.security.settings import SecuritySettings

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    store = KeyStore(keys_file)
    limits = {k.removeprefix("EDGEGEN_SECURITY__").lower(): float(v) for k, v in UNLIMITED.items()}
    settings = SecuritySettings(**limits)  # type: ignore[arg-type]
    variants = {
        "bare app": app,
        "gate, auth off": SecurityGate(
            app, settings.model_copy(update={"auth": False}), Authenticator(store, None), None,
            SecurityMetrics(CollectorRegistry()),
        ),
        "gate, API key": SecurityGate(
            app, settings, Authenticator(store, None), None, SecurityMetrics(CollectorRegistry())
        ),
    }  # fmt: skip
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"2"),
               (b"authorization", f"Bearer {key}".encode())]  # fmt: skip

    async def run(entry: Any) -> float:
        started = time.perf_counter()
        for _ in range(requests):
            scope = {"type": "http", "method": "POST", "path": "/predict", "raw_path": b"/predict",
                     "query_string": b"", "headers": headers, "client": ("127.0.0.1", 40000)}  # fmt: skip
            await entry(scope, receive, send)
        return (time.perf_counter() - started) / requests * 1e6

    out = {
        name: statistics.median(asyncio.run(run(entry)) for _ in range(repeats))
        for name, entry in variants.items()
    }
    store.close()
    return out


def compare(rows: list[dict[str, Any]], base: str, other: str) -> dict[str, Any]:
    """Per level: median and min–max, over rounds, of other's p50 / base's p50 and of the difference."""
    out = {}
    for c in LEVELS:
        pairs = [
            (a["p50_us"], b["p50_us"])
            for a in rows if a["server"] == base and a["concurrency"] == c
            for b in rows if b["server"] == other and b["concurrency"] == c and b["round"] == a["round"]
        ]  # fmt: skip
        ratios = [b / a for a, b in pairs]
        added = [(b - a) / 1000 for a, b in pairs]
        out[f"c{c}"] = {
            "p50_ratio": [statistics.median(ratios), min(ratios), max(ratios)],
            "p50_added_ms": [statistics.median(added), min(added), max(added)],
            "base_p50_ms": statistics.median(a for a, _ in pairs) / 1000,
            "wrong": sum(r["wrong"] for r in rows if r["concurrency"] == c),
            "errors": sum(r["non_200"] + r["socket_errors"] for r in rows if r["concurrency"] == c),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=5)
    args = parser.parse_args()
    result = new_result()
    with tempfile.TemporaryDirectory(prefix="edgegen-security-bench-") as tmp:
        root = Path(tmp)
        home, data, wrk_bin = digits_workload(root)
        keys = KeyStore(home / "security" / "keys.sqlite")
        key = keys.create("user", label="bench")[0]
        keys.close()
        pki = Pki(home / "pki")
        pki.init()
        pki.issue("node", "node")
        pki.issue("gw", "gateway")
        tls = {
            "EDGEGEN_TLS__CERT_FILE": str(pki.root / "node.crt"),
            "EDGEGEN_TLS__KEY_FILE": str(pki.root / "node.key"),
            "EDGEGEN_TLS__CLIENT_CA_FILE": str(pki.root / "ca.crt"),
        }
        off, on = node(home, "auth-off", False), node(home, "auth-on", True)
        secure = node(home, "auth-on-tls", True, tls)
        plain_gw = gateway(root, "gw-plain", on.base_url, None)
        mtls_gw = gateway(root, "gw-mtls", f"https://127.0.0.1:{secure.port}", pki.root)
        started: list[Server] = []
        try:
            for server in (off, on, secure, plain_gw, mtls_gw):
                start(server, root)
                started.append(server)
            result["gate_us"] = gate_cost(home / "security" / "keys.sqlite", key)
            console.print(f"gate cost in process (µs/request): {result['gate_us']}")
            rows = measure([off, on], key, args.rounds, args.duration, data, wrk_bin, "auth")
            rows += measure([plain_gw, mtls_gw], key, args.rounds, args.duration, data, wrk_bin, "mtls")
        finally:
            for server in reversed(started):
                stop(server)
    result["runs"] = rows
    result["auth"] = compare([r for r in rows if r["part"] == "auth"], "auth-off", "auth-on")
    result["mtls"] = compare([r for r in rows if r["part"] == "mtls"], "gw-plain", "gw-mtls")
    for part, figures in (("auth", result["auth"]), ("mtls", result["mtls"])):
        for level, f in figures.items():
            ratio, added = f["p50_ratio"], f["p50_added_ms"]
            console.print(
                f"{part} {level}: p50 ratio {ratio[0]:.3f} ({ratio[1]:.3f}–{ratio[2]:.3f}), added "
                f"{added[0]:.3f} ms ({added[1]:.3f}–{added[2]:.3f}) over {f['base_p50_ms']:.3f} ms; "
                f"wrong {f['wrong']}, errors {f['errors']}"
            )
    console.print(f"results: {save_result('security', result)}")


if __name__ == "__main__":
    main()
