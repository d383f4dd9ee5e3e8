"""A node's admin routes (operator or admin role; over mutual TLS only from a gateway or an admin
certificate — the security gate decides, before any of this runs).

    GET  /admin/models                     every model in the store: versions, the active and served one
    POST /admin/models/{name}/activate     {"version": "3"}: check the package, load it (a GGUF in a
                                           child process first), then make it ACTIVE and serve it; a
                                           version that fails to load changes nothing (422)
    POST /admin/models/{name}/pull         {"url": "https://…/pkg.tar.gz", "activate": true}: fetch a
                                           signed package from an allowed source (security/sources.py)
    PUT  /admin/models/{name}/package      body: a signed package archive (`edgegen models export`),
                                           ?version=&activate=true: what a gateway's push sends each node
    GET  /admin/status                     version, models served, load (CPU time, memory, requests in
                                           flight), jobs and cache: what the gateway's fleet view shows
    GET  /admin/config                     the settings in force (secrets as stars), those changed remotely,
                                           and why a remote file was passed over (remote_problems)
    PATCH /admin/config                    {"changes": {"cache.ttl_s": 60, …}}: validated, persisted, applied
                                           at once where the setting allows, else at the next restart
    GET  /admin/packages                   installed Python packages, for the gateway's vulnerability scan
    POST /admin/restart                    restart in place, gracefully (http/serving.py); a gateway
                                           drains the node first (POST /gateway/nodes/{name}/restart)
    GET  /admin/software                   the edgegen environments: running, current, previous, on trial
    PUT  /admin/software/wheels/{file}     body: an edgegen wheel, X-Edgegen-Signature: its signature
                                           record; checked, installed into an environment of its own
    POST /admin/software/switch            {"env": "<id>"}: restart into it, on trial (node/software.py)
    POST /admin/software/confirm           the version on trial passed its health gate: keep it
    POST /admin/software/rollback          leave the trial, or go back to the previous environment
    GET  /admin/audit?limit=50             the audit log's last entries and whether its chain holds
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from edgegen import __version__
from edgegen.errors import Conflict, InvalidInput, ModelNotFound, Unprocessable
from edgegen.http.responses import json_response
from edgegen.http.serving import can_restart, request_exit, request_restart, top_pid
from edgegen.node import remote_config, software
from edgegen.node.state import NodeState, node_of
from edgegen.security.vulns import installed_packages
from edgegen.store.archive import ARCHIVE_SUFFIXES, archive_kind
from edgegen.store.manifest import check_name

router = APIRouter(prefix="/admin", tags=["admin"])
log = logging.getLogger("edgegen.admin")


class Activation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)


@router.get("/status", summary="What the node serves and how loaded it is")
async def status(request: Request) -> Response:
    node = node_of(request)
    registry = node.registry
    out: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - node.started, 3),
        "ready": registry.ready,
        "models": {name: registry.get(name).manifest.version for name in registry.names()},
        "refused": registry.refused(),
        "in_flight": node.in_flight(),
        "pid": os.getpid(),
        "started_at": round(time.time() - (time.monotonic() - node.started), 3),
        "time": time.time(),
        "cpus": os.cpu_count() or 0,
        "load_average": list(os.getloadavg()),
        "software": {
            "env": software.running_env(node.settings.home),
            "trial": software.on_trial(node.settings.home),
        },
    }
    system = node.metrics.system
    if system is not None:
        usage = system.usage()
        out |= {"cpu_seconds": round(usage.user_s + usage.system_s, 3), "rss_bytes": usage.rss_bytes}
    if node.jobs is not None:
        out["jobs"] = await node.jobs.counts()
    if node.cache is not None:
        memory, disk = node.cache.memory, node.cache.disk
        disk_bytes, disk_entries = disk.usage if disk else (0, 0)  # (one read: its writer thread counts)
        out["cache"] = {
            "memory_bytes": memory.bytes if memory else 0,
            "memory_entries": len(memory) if memory else 0,
            "disk_bytes": disk_bytes,
            "disk_entries": disk_entries,
        }
    return json_response(out)


class ConfigChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    changes: dict[str, Any]


@router.get("/config", summary="The settings in force, and those changed remotely")
async def config(request: Request) -> Response:
    return json_response(remote_config.effective(node_of(request).settings))


@router.patch("/config", summary="Change settings: validated, persisted, applied live where they can be")
async def change_config(order: ConfigChange, request: Request) -> Response:
    # (off the event loop: the change waits for the other workers' and writes with fsync)
    return json_response(
        await asyncio.to_thread(remote_config.change, node_of(request).settings, order.changes)
    )


@router.post("/restart", status_code=202, summary="Restart the node in place, gracefully")
async def restart(request: Request) -> Response:
    node = node_of(request)
    multiprocess = node.metrics.multiprocess
    if not can_restart(multiprocess):
        raise Conflict("this node was not started by `edgegen serve`; its supervisor restarts it")
    # (the security gate writes the call to the audit log, as every admin change)
    # After this answer is on its way: the shutdown waits for in-flight requests, this one included.
    asyncio.get_running_loop().call_later(0.05, request_restart, multiprocess)
    return json_response({"restarting": True, "pid": os.getpid(), "workers": multiprocess}, 202)


@router.get("/software", summary="The edgegen environments of this node")
async def software_state(request: Request) -> Response:
    return json_response(software.view(node_of(request).settings.home))


@router.put("/software/wheels/{filename}", status_code=201, summary="Stage a signed edgegen wheel")
async def stage_software(filename: str, request: Request) -> Response:
    signature = request.headers.get("x-edgegen-signature")
    if not signature:
        raise InvalidInput("X-Edgegen-Signature is missing: the wheel's signature (`edgegen software sign`)")
    wheel = await request.body()
    if not wheel:
        raise InvalidInput("the body must be the wheel")
    settings = node_of(request).settings
    staged = await asyncio.to_thread(software.stage, settings, filename, wheel, signature.encode())
    return json_response(staged, 201)


class SoftwareSwitch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    env: str = Field(min_length=1, max_length=80)


@router.post("/software/switch", status_code=202, summary="Restart into another environment, on trial")
async def switch_software(order: SoftwareSwitch, request: Request) -> Response:
    return _leave(request, lambda home, pid: software.switch(home, order.env, pid))


@router.post("/software/confirm", summary="Keep the version on trial: it passed its health gate")
async def confirm_software(request: Request) -> Response:
    return json_response(software.confirm(node_of(request).settings.home))


@router.post("/software/rollback", status_code=202, summary="Leave the trial, or go back a version")
async def rollback_software(request: Request) -> Response:
    return _leave(request, software.rollback)


def _leave(request: Request, order: Callable[[Path, int], dict[str, Any]]) -> Response:
    """Record a switch of environment (`order`), then stop gracefully so the process can become it."""
    node = node_of(request)
    multiprocess = node.metrics.multiprocess
    if not can_restart(multiprocess):
        raise Conflict("this node was not started by `edgegen serve`; it cannot change its environment")
    answer = order(node.settings.home, top_pid(multiprocess))
    asyncio.get_running_loop().call_later(0.05, request_exit, multiprocess)
    return json_response(answer, 202)


@router.get("/models", summary="The model store: versions, active and served")
async def models(request: Request) -> Response:
    node = node_of(request)
    out = []
    for info in node.store.list():
        served = node.registry.get(info.name).manifest.version if node.registry.is_ready(info.name) else None
        out.append({"name": info.name, "versions": info.versions, "active": info.active, "served": served})
    return json_response({"models": out})


@router.post("/models/{name}/activate", summary="Serve another version of a model")
async def activate(name: str, change: Activation, request: Request) -> Response:
    node = node_of(request)
    check_name(name)
    version = check_name(change.version, "version")
    if version not in node.store.versions(name):
        raise ModelNotFound(f"model {name!r} has no version {version!r}")
    previous = await _serve(node, name, version)
    return json_response({"name": name, "active": version, "previous": previous})


async def _serve(node: NodeState, name: str, version: str) -> str | None:
    """Load `version` (a GGUF in a child process first), then make it ACTIVE and serve it; on failure
    ACTIVE and the served version stay as they were (422). Returns the version active before."""
    previous = node.store.active_version(name)
    await node.registry.activate(name, version)
    return previous


class Pull(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2048)
    version: str | None = Field(None, min_length=1, max_length=64)
    activate: bool = False


@router.post("/models/{name}/pull", status_code=201, summary="Add a signed package from an allowed source")
async def pull(name: str, order: Pull, request: Request) -> Response:
    """Only from `security.model_sources`, never from loopback, link-local or private addresses the
    operator did not name, no redirects; the package must be an archive a trusted key signed."""
    # Here, not at start-up: aiohttp (about 200 ms and 10 MB) is only a node's when it pulls a package.
    from edgegen.security.sources import check_source, download

    node = node_of(request)
    version = _check_package(node, name, order.version, "pulled")
    security = node.settings.security
    source = await asyncio.to_thread(check_source, order.url, security.model_sources)
    suffix = next((s for s in ARCHIVE_SUFFIXES if urlsplit(order.url).path.lower().endswith(s)), None)
    if suffix is None:
        raise InvalidInput(f"a pulled package is an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    node.settings.home.mkdir(parents=True, exist_ok=True)  # downloads land beside the store, not in /tmp
    with tempfile.TemporaryDirectory(prefix="edgegen-pull-", dir=node.settings.home) as tmp:
        archive = Path(tmp) / f"package{suffix}"
        size = await download(source, archive, security.max_pull_bytes, security.model_sources_ca)
        manifest = await asyncio.to_thread(
            node.store.add, archive, name, version, activate=False, max_bytes=security.max_pull_bytes
        )
    log.info(
        "model pulled", extra={"model": name, "version": manifest.version, "bytes": size, "host": source.host}
    )
    return await _added(node, name, manifest.version, order.activate)


@router.put("/models/{name}/package", status_code=201, summary="Add a signed package sent in the body")
async def push(
    name: str,
    request: Request,
    version: str | None = Query(None, min_length=1, max_length=64),
    activate: bool = False,
) -> Response:
    """The body is a package archive (tar, tar.gz or zip, told by its first bytes) a trusted key signed;
    it is written to disk as it arrives, up to `security.max_pull_bytes`."""
    node = node_of(request)
    version = _check_package(node, name, version, "pushed")
    node.settings.home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgegen-push-", dir=node.settings.home) as tmp:
        received = Path(tmp) / "package"
        size = 0
        with received.open("wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
                size += len(chunk)
        archive = received.rename(received.with_name("package" + archive_kind(received)))
        limit = node.settings.security.max_pull_bytes  # unpacked, too: store/archive.py bounds it further
        manifest = await asyncio.to_thread(
            node.store.add, archive, name, version, activate=False, max_bytes=limit
        )
    log.info("model pushed", extra={"model": name, "version": manifest.version, "bytes": size})
    return await _added(node, name, manifest.version, activate)


def _check_package(node: NodeState, name: str, version: str | None, how: str) -> str | None:
    check_name(name)
    if node.store.trust is None:
        raise Unprocessable(f"this node trusts no signing key, so it cannot check a {how} package")
    return check_name(version, "version") if version is not None else None


async def _added(node: NodeState, name: str, version: str, activate: bool) -> Response:
    previous = await _serve(node, name, version) if activate else None
    return json_response({"name": name, "version": version, "activated": activate, "previous": previous}, 201)


@router.get("/packages", summary="The Python packages this node runs (for the fleet's vulnerability scan)")
async def packages(request: Request) -> Response:
    node = node_of(request)
    if node.packages is None:
        node.packages = installed_packages()
    return json_response({"packages": [{"name": n, "version": v} for n, v in node.packages]})


@router.get("/audit", summary="The audit log's last entries")
async def audit(request: Request, limit: int = Query(50, ge=1, le=1000)) -> Response:
    log = node_of(request).audit
    entries = [entry.__dict__ for entry in log.tail(limit)]
    return json_response({"entries": entries, "chain_broken_at": log.verify()})
