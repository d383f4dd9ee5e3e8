"""Signed model packages (Ed25519): a package is served only when a trusted key signed its manifest.

    signer = Signer.local(home)                  # HOME/security/signing.key (0600) and .pub, made once
    signer.sign(package_dir)                     # writes package_dir/manifest.sig
    Trust.load([home / "security" / "signing.pub"]).verify(package_dir, manifest)   # or IntegrityError

The signature covers the manifest — which holds the sha256 of every file — in a canonical form
without its name and version, so a package keeps its signature when a store files it under another
name or version, and any change to a file or to the manifest's content breaks it.

`manifest.sig` is JSON: `{"key_id": "<16 hex digits of sha256(public key)>", "signature": "<base64>"}`.
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
        signature = self.private.sign(signed_bytes(manifest))
        record = {"key_id": self.key_id, "signature": base64.b64encode(signature).decode()}
        (package_dir / SIGNATURE_FILE).write_bytes(orjson.dumps(record))


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
            record = orjson.loads((package_dir / SIGNATURE_FILE).read_bytes())
            signer, signature = str(record["key_id"]), base64.b64decode(record["signature"], validate=True)
        except FileNotFoundError:
            raise IntegrityError(f"{where} is not signed; sign it with `edgegen models sign`") from None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise IntegrityError(f"{where}: its signature file is malformed") from None
        key = self.keys.get(signer)
        if key is None:
            raise IntegrityError(f"{where} is signed by key {signer}, which this node does not trust")
        try:
            key.verify(signature, signed_bytes(manifest))
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
    local = local_key_paths(settings.home)[1]
    paths = [*settings.security.trusted_signers, *([local] if local.exists() else [])]
    if not paths and mode == "auto":
        return None
    return Trust.load(paths)
