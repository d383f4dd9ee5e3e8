"""Signed model packages (Ed25519): a package is served only when a trusted key signed its manifest.

    signer = Signer.local(home)                  # HOME/security/signing.key (0600) and .pub, made once
    signer.sign(package_dir)                     # writes package_dir/manifest.sig
    Trust.load([home / "security" / "signing.pub"]).verify(package_dir, manifest)   # or IntegrityError

The signature covers the manifest — which holds the sha256 of every file — in a canonical form
without its name and version, so a package keeps its signature when a store files it under another
name or version, and any change to a file or to the manifest's content breaks it.

`manifest.sig` is JSON: `{"key_id": "<16 hex digits of sha256(public key)>", "signature": "<base64>"}`.

Software for a node (an edgegen wheel, node/software.py) is signed the same way, the signature over the
file's bytes, in `<wheel>.sig` beside it (`edgegen software sign`); `software_trust` never runs unsigned code.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgegen.errors import ConfigError, IntegrityError
from edgegen.store.manifest import SIGNATURE_FILE, Manifest

if TYPE_CHECKING:
    from edgegen.config import Settings


def signed_bytes(manifest: Manifest) -> bytes:
    content = manifest.model_dump(mode="json", exclude={"name", "version"})
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def local_key_paths(home: Path) -> tuple[Path, Path]:
    return home / "security" / "signing.key", home / "security" / "signing.pub"


class Signer:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.key_id = key_id(private.public_key())

    @classmethod
    def local(cls, home: Path) -> Signer:
        """This machine's signing key, created on first use (private 0600, public beside it)."""
        private_path, public_path = local_key_paths(home)
        if private_path.exists():
            return cls.load(private_path)
        private_path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
        public_path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(key)

    @classmethod
    def load(cls, path: Path) -> Signer:
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the signing key {path}: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def sign(self, package_dir: Path) -> None:
        manifest = Manifest.read(package_dir / "manifest.json")
        (package_dir / SIGNATURE_FILE).write_bytes(self.record(signed_bytes(manifest)))

    def record(self, message: bytes) -> bytes:
        """The signature record (JSON, one line) of `message`."""
        signature = self.private.sign(message)
        return orjson.dumps({"key_id": self.key_id, "signature": base64.b64encode(signature).decode()})


class Trust:
    """The public keys whose signatures a store accepts."""

    def __init__(self, keys: list[Ed25519PublicKey]) -> None:
        self.keys = {key_id(k): k for k in keys}

    @classmethod
    def load(cls, paths: list[Path]) -> Trust:
        keys = []
        for path in paths:
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read the trusted signer key {path}: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{path} is not an Ed25519 public key")
            keys.append(key)
        return cls(keys)

    def verify(self, package_dir: Path, manifest: Manifest) -> str:
        """The id of the trusted key that signed this package, or IntegrityError."""
        where = f"{manifest.name}/{manifest.version}"
        try:
            record = (package_dir / SIGNATURE_FILE).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{where} is not signed; sign it with `edgegen models sign`") from None
        return self.check(record, signed_bytes(manifest), where)

    def check(self, record: bytes, message: bytes, where: str) -> str:
        """The id of the trusted key whose signature `record` is of `message`, or IntegrityError."""
        try:
            data = orjson.loads(record)
            signer, signature = str(data["key_id"]), base64.b64decode(data["signature"], validate=True)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise IntegrityError(f"{where}: its signature is malformed") from None
        key = self.keys.get(signer)
        if key is None:
            raise IntegrityError(f"{where} is signed by key {signer}, which this node does not trust")
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise IntegrityError(f"{where}: its signature does not match its content") from None
        return signer


def store_trust(settings: Settings) -> Trust | None:
    """The trust a node's store enforces (`security.signed_models`): `off` none; `required` the
    trusted signers and this machine's own key; `auto` the same as soon as there is any such key,
    else none (a store nobody ever signed for)."""
    mode = settings.security.signed_models
    if mode == "off":
        return None
    paths = _trusted_paths(settings)
    if not paths and mode == "auto":
        return None
    return Trust.load(paths)


def software_trust(settings: Settings) -> Trust:
    """The trust a node's software upgrades need, whatever `signed_models` says: the trusted signers and
    this machine's own key; with none, no upgrade is accepted (ConfigError)."""
    paths = _trusted_paths(settings)
    if not paths:
        raise ConfigError(
            "this node trusts no signing key (security.trusted_signers, HOME/security/signing.pub): "
            "it accepts no software upgrade"
        )
    return Trust.load(paths)


def _trusted_paths(settings: Settings) -> list[Path]:
    local = local_key_paths(settings.home)[1]
    return [*settings.security.trusted_signers, *([local] if local.exists() else [])]
