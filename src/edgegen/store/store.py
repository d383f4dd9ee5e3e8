"""The model store on disk.

    <store>/<name>/<version>/model.onnx | model.tflite | model.gguf
    <store>/<name>/<version>/manifest.json
    <store>/<name>/<version>/manifest.sig   its Ed25519 signature (security/signing.py), when signed
    <store>/<name>/ACTIVE          the served version, one line

A version directory appears whole or not at all (built beside it, then renamed), and ACTIVE is replaced
atomically, so a node reading the store never sees half a package. Old versions stay for rollback.
Every path is built from validated names and checked to stay under the store root. A package archive is
unpacked inside the store root too (`.unpack-…`, removed after), never in the system's temp directory.
ACTIVE is written only after the version was checked and, when the store has a `probe`, loaded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgegen import __version__
from edgegen.errors import IntegrityError, ModelNotFound, StoreError, VersionExists
from edgegen.store.archive import DEFAULT_MAX_BYTES, is_archive, unpacked
from edgegen.store.gguf import describe as describe_gguf
from edgegen.store.manifest import (
    ENCRYPTED_MAGIC,
    MODEL_FILES,
    SIGNATURE_FILE,
    Format,
    Manifest,
    TensorSpec,
    check_name,
    sha256_file,
)

if TYPE_CHECKING:
    from edgegen.security.atrest import Keyring
    from edgegen.security.signing import Signer, Trust


def encrypted_file(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(ENCRYPTED_MAGIC)) == ENCRYPTED_MAGIC


def in_memory_file(data: bytes, name: str) -> int:
    """A file descriptor of an anonymous in-memory file holding `data` (Linux memfd)."""
    fd = os.memfd_create(f"edgegen-{name}", os.MFD_CLOEXEC)
    with open(fd, "wb", closefd=False) as out:
        out.write(data)
    return fd


Describe = Callable[[Path, Format], tuple[list[TensorSpec], list[TensorSpec]]]
# Loads a verified version where a crash cannot hurt (executors/probe.py), or raises why it does not load.
Probe = Callable[["ModelPackage"], None]
SUFFIX_FORMATS: dict[str, Format] = {".onnx": "onnx", ".tflite": "tflite", ".gguf": "gguf"}


def format_of(model: Path) -> Format:
    fmt = SUFFIX_FORMATS.get(model.suffix.lower())
    if fmt is None:
        raise StoreError(f"unknown model format {model.suffix!r}: use .onnx, .tflite or .gguf")
    return fmt


def manifest_for(
    model: Path,
    name: str,
    version: str,
    *,
    task: str = "classification",
    metadata: dict[str, object] | None = None,
    producer: str = f"edgegen {__version__}",
    describe: Describe | None = None,
) -> Manifest:
    """The manifest of a package directory that holds `model` (named model.onnx, .tflite or .gguf):
    inputs and outputs read from the file by `describe` (edgegen.executors' `describe_model`, passed
    down by whoever builds the store: the store sits below the executors), or, for a GGUF, by the
    store's own reader; its sha256; and what the caller knows about it."""
    fmt = format_of(model)
    if describe is not None:
        inputs, outputs = describe(model, fmt)
    elif fmt == "gguf":
        inputs, outputs, _ = describe_gguf(model)
    else:
        raise StoreError(f"this store was opened without a reader for {fmt} files; add them with the CLI")
    return Manifest(
        name=name,
        version=version,
        format=fmt,
        task=task,
        inputs=inputs,
        outputs=outputs,
        files={model.name: sha256_file(model)},
        producer=producer,
        metadata=metadata or {},
    )


@dataclass(frozen=True)
class ModelPackage:
    """One verified version: its manifest and the directory holding its files. When its model file is
    encrypted at rest, `plain_fd` is an in-memory file (memfd) holding the verified plaintext, and
    `model_path` names it: the executors open a path, and the plaintext never touches the disk."""

    manifest: Manifest
    path: Path
    plain_fd: int | None = None

    @property
    def model_path(self) -> Path:
        if self.plain_fd is not None:
            return Path(f"/proc/self/fd/{self.plain_fd}")
        return self.path / self.manifest.model_file

    def close(self) -> None:
        """Free the in-memory plaintext, once whatever opened `model_path` is done with it."""
        if self.plain_fd is not None:
            os.close(self.plain_fd)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: list[str]
    active: str | None


def _version_key(version: str) -> tuple[int, int | str]:
    # Integer versions sort numerically and after none of the named ones.
    return (0, int(version)) if version.isdigit() else (1, version)


class ModelStore:
    """`trust`: open (and so activate and serve) only packages a trusted key signed, and add a
    package directory only when it is so signed. `signer`: sign every version this store adds.
    `keyring`: encrypt the files of every version it adds (AES-256-GCM, security/atrest.py) and
    decrypt encrypted ones on open; manifests and signatures always describe the plaintext.
    `probe`: load each version before ACTIVE may point at it (the CLI's store; a node's registry
    loads a version itself before it calls `activate`). `describe`: read a bare ONNX or TFLite file's
    inputs and outputs, to add it (a GGUF, and a package directory with its manifest, need none)."""

    def __init__(
        self,
        root: Path,
        *,
        trust: Trust | None = None,
        signer: Signer | None = None,
        keyring: Keyring | None = None,
        probe: Probe | None = None,
        describe: Describe | None = None,
    ) -> None:
        self.root = root
        self.trust = trust
        self.signer = signer
        self.keyring = keyring
        self.probe = probe
        self.describe = describe

    # -- paths -------------------------------------------------------------------------------------
    def _inside(self, path: Path) -> Path:
        root = self.root.resolve()
        resolved = path.resolve()
        if not resolved.is_relative_to(root) or path.is_symlink():
            raise StoreError("path leaves the model store")
        return path

    def _model_dir(self, name: str) -> Path:
        return self._inside(self.root / check_name(name))

    def _version_dir(self, name: str, version: str) -> Path:
        return self._inside(self._model_dir(name) / check_name(version, "version"))

    # -- reading -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def versions(self, name: str) -> list[str]:
        model_dir = self._model_dir(name)
        if not model_dir.is_dir():
            raise ModelNotFound(f"model {name!r} is not in the store")
        found = [p.name for p in model_dir.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
        return sorted(found, key=_version_key)

    def active_version(self, name: str) -> str | None:
        pointer = self._model_dir(name) / "ACTIVE"
        try:
            version = pointer.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return check_name(version, "version")

    def list(self) -> list[ModelInfo]:
        return [ModelInfo(n, self.versions(n), self.active_version(n)) for n in self.names()]

    def open(self, name: str, version: str | None = None) -> ModelPackage:
        """Return a package whose every file matches its sha256, or raise.

        With no version, the active one. Raises ModelNotFound, IntegrityError.
        """
        if version is None:
            version = self.active_version(name)
            if version is None:
                raise ModelNotFound(f"model {name!r} has no active version")
        path = self._version_dir(name, version)
        if not path.is_dir():
            raise ModelNotFound(f"model {name!r} has no version {version!r}")
        manifest = Manifest.read(path / "manifest.json")
        if (manifest.name, manifest.version) != (name, version):
            raise IntegrityError(f"manifest of {name}/{version} names {manifest.name}/{manifest.version}")
        if self.trust is not None:
            self.trust.verify(path, manifest)
        plain_fd = None
        try:
            for file, expected in manifest.files.items():
                file_path = self._inside(path / file)
                if not file_path.is_file():
                    raise IntegrityError(f"{name}/{version}: {file} is missing")
                if encrypted_file(file_path):
                    plain = self._decrypt(file_path, f"{name}/{version}/{file}")
                    if hashlib.sha256(plain).hexdigest() != expected:
                        raise IntegrityError(f"{name}/{version}: {file} does not match its sha256")
                    if file == manifest.model_file:
                        plain_fd = in_memory_file(plain, f"{name}-{version}")
                elif sha256_file(file_path) != expected:
                    raise IntegrityError(f"{name}/{version}: {file} does not match its sha256")
        except BaseException:
            if plain_fd is not None:
                os.close(plain_fd)
            raise
        return ModelPackage(manifest, path, plain_fd)

    def _decrypt(self, file_path: Path, context: str) -> bytes:
        if self.keyring is None:
            raise IntegrityError(f"{context} is encrypted at rest and this node has no encryption key")
        return self.keyring.decrypt(file_path.read_bytes(), context.encode())

    def encrypt(self, name: str, version: str) -> int:
        """Encrypt a version's files in place, or re-encrypt them under the keyring's newest key
        (rotation); return how many files were written. Checked first, replaced atomically."""
        if self.keyring is None:
            raise StoreError("no encryption key is configured (EDGEGEN_ENCRYPTION_KEYS or a key file)")
        self.open(name, version).close()
        path = self._version_dir(name, version)
        written = 0
        for file in Manifest.read(path / "manifest.json").files:
            file_path, context = path / file, f"{name}/{version}/{file}".encode()
            data = file_path.read_bytes()
            encrypted = data.startswith(ENCRYPTED_MAGIC)
            blob = self.keyring.rotate(data, context) if encrypted else self.keyring.encrypt(data, context)
            tmp = file_path.with_name(f".{file}.{uuid.uuid4().hex}")
            tmp.write_bytes(blob)
            os.replace(tmp, file_path)
            written += 1
        return written

    # -- writing -----------------------------------------------------------------------------------
    def next_version(self, name: str) -> str:
        try:
            numbers = [int(v) for v in self.versions(name) if v.isdigit()]
        except ModelNotFound:
            numbers = []
        return str(max(numbers, default=0) + 1)

    def add(
        self,
        source: Path,
        name: str,
        version: str | None = None,
        *,
        task: str = "classification",
        metadata: dict[str, object] | None = None,
        activate: bool | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> Manifest:
        """Copy a model file, a package directory or a package archive (store/archive.py: unpacked
        safely under the store root, at most `max_bytes` of it, then taken as a directory) into the
        store as `name`/`version`.

        A bare file (`.onnx`, `.tflite`, `.gguf`) gets a manifest whose inputs and outputs are read from
        the file (`manifest_for`); a directory must hold a manifest whose hashes match. A GGUF model is
        checked as llama.cpp will build it (store/gguf_hparams.py) either way. The first version of a
        model becomes active unless `activate` is False; later ones only when it is True.
        """
        if is_archive(source):
            self.root.mkdir(parents=True, exist_ok=True)
            with unpacked(source, self.root, max_bytes) as package_dir:
                return self.add(package_dir, name, version, task=task, metadata=metadata, activate=activate)
        check_name(name)
        version = check_name(version, "version") if version is not None else self.next_version(name)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            manifest = self._stage(source, staging, name, version, task, metadata or {})
            target = self._version_dir(name, version)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                raise VersionExists(f"model {name!r} already has version {version!r}")
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if activate or (activate is None and self.active_version(name) is None):
            self.activate(name, version)
        return manifest

    def _stage(
        self,
        source: Path,
        staging: Path,
        name: str,
        version: str,
        task: str,
        metadata: dict[str, object],
    ) -> Manifest:
        if source.is_dir():
            given = Manifest.read(source / "manifest.json")
            if self.trust is not None:
                self.trust.verify(source, given)
            for file, expected in given.files.items():
                src = source / file
                if src.is_symlink() or not src.is_file() or sha256_file(src) != expected:
                    raise IntegrityError(f"package file {file} is missing or does not match its sha256")
                shutil.copyfile(src, staging / file)
            manifest = given.model_copy(update={"name": name, "version": version})
            # A signature vouches for who made a model, not that llama.cpp can load it.
            if manifest.format == "gguf":
                describe_gguf(staging / manifest.model_file)
        elif source.is_file():
            model_file = staging / MODEL_FILES[format_of(source)]
            shutil.copyfile(source, model_file)
            manifest = manifest_for(
                model_file, name, version, task=task, metadata=metadata, describe=self.describe
            )
        else:
            raise StoreError(f"{source} is neither a model file nor a package directory")
        manifest.write(staging / "manifest.json")
        if self.keyring is not None:
            for file in manifest.files:
                plain = (staging / file).read_bytes()
                (staging / file).write_bytes(self.keyring.encrypt(plain, f"{name}/{version}/{file}".encode()))
        signature = source / SIGNATURE_FILE
        if self.signer is not None:
            self.signer.sign(staging)
        elif source.is_dir() and signature.is_file() and not signature.is_symlink():
            shutil.copyfile(signature, staging / SIGNATURE_FILE)  # it covers the content, not the name
        return manifest

    def activate(self, name: str, version: str) -> Manifest:
        """Point ACTIVE at `version` after checking the package (and loading it, with a `probe`); the
        old version stays on disk. On any failure ACTIVE is left as it was."""
        package = self.open(name, version)
        try:
            if self.probe is not None:
                self.probe(package)
        finally:
            package.close()
        model_dir = self._model_dir(name)
        tmp = model_dir / f".ACTIVE.{uuid.uuid4().hex}"
        tmp.write_text(version + "\n", encoding="utf-8")
        os.replace(tmp, model_dir / "ACTIVE")
        return package.manifest
