"""Encryption at rest: AES-256-GCM with named keys, so keys can rotate while old data stays readable.

    keyring = Keyring.parse("k2:<base64 32 bytes>,k1:<base64 32 bytes>")   # the first key encrypts
    blob = keyring.encrypt(data, context=b"models/digits/3/model.onnx")
    keyring.decrypt(blob, context=b"models/digits/3/model.onnx") == data

Layout of a blob: b"EGENC1" | key-id length (1 byte) | key id | 12-byte random nonce | ciphertext+tag.
The magic, the key id and the caller's `context` (what the bytes are, e.g. their path) are authenticated
as associated data: a blob moved to another place, or given another key id, fails to decrypt. Keys come
from `EDGEGEN_ENCRYPTION_KEYS` or a key file (same syntax, one key per line), never from the command line.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgegen.errors import ConfigError, IntegrityError
from edgegen.store.manifest import ENCRYPTED_MAGIC as MAGIC

_KEY_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
NONCE_BYTES = 12


def new_key() -> str:
    """A fresh key, base64 (what a key file or EDGEGEN_ENCRYPTION_KEYS holds after `id:`)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()


class Keyring:
    def __init__(self, keys: list[tuple[str, bytes]]) -> None:
        if not keys:
            raise ConfigError("an encryption keyring needs at least one key")
        ids = [key_id for key_id, _ in keys]
        if len(set(ids)) != len(ids):
            raise ConfigError("encryption key ids must be unique")
        self.active = ids[0]
        self._keys = {key_id: AESGCM(secret) for key_id, secret in keys}

    @classmethod
    def parse(cls, text: str) -> Keyring:
        """`id:base64key` entries separated by commas or new lines; the first one encrypts."""
        keys = []
        for entry in filter(None, (part.strip() for part in re.split(r"[,\n]", text))):
            key_id, sep, encoded = entry.partition(":")
            if not sep or not _KEY_ID.match(key_id):
                raise ConfigError("an encryption key reads id:base64 (id: letters, digits, . _ -)")
            try:
                secret = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise ConfigError(f"encryption key {key_id} is not valid base64") from None
            if len(secret) != 32:
                raise ConfigError(f"encryption key {key_id} must be 32 bytes (AES-256), not {len(secret)}")
            keys.append((key_id, secret))
        return cls(keys)

    @classmethod
    def load(cls, key_file: Path | None = None) -> Keyring | None:
        """From `key_file`, else EDGEGEN_ENCRYPTION_KEYS; None when neither is set."""
        if key_file is not None:
            return cls.parse(key_file.read_text())
        env = os.environ.get("EDGEGEN_ENCRYPTION_KEYS")
        return cls.parse(env) if env else None

    @property
    def ids(self) -> frozenset[str]:
        """The ids of every key held: what the keyring can decrypt."""
        return frozenset(self._keys)

    def encrypt(self, data: bytes, context: bytes = b"") -> bytes:
        key_id = self.active.encode()
        header = MAGIC + bytes([len(key_id)]) + key_id
        nonce = os.urandom(NONCE_BYTES)
        return header + nonce + self._keys[self.active].encrypt(nonce, data, header + context)

    def decrypt(self, blob: bytes, context: bytes = b"") -> bytes:
        if not is_encrypted(blob):
            raise IntegrityError("the data is not an edgegen encrypted blob")
        length = blob[len(MAGIC)]
        start = len(MAGIC) + 1
        key_id = blob[start : start + length].decode(errors="replace")
        header = blob[: start + length]
        nonce = blob[start + length : start + length + NONCE_BYTES]
        cipher = self._keys.get(key_id)
        if cipher is None:
            raise IntegrityError(f"the data was encrypted with key {key_id!r}, which the keyring lacks")
        try:
            return cipher.decrypt(nonce, blob[start + length + NONCE_BYTES :], header + context)
        except InvalidTag:
            raise IntegrityError(
                f"decryption with key {key_id!r} failed: wrong key, or the data was changed"
            ) from None

    def rotate(self, blob: bytes, context: bytes = b"") -> bytes:
        """The same data under the active key (a no-op copy when it already is)."""
        return self.encrypt(self.decrypt(blob, context), context)


def is_encrypted(blob: bytes) -> bool:
    return blob.startswith(MAGIC) and len(blob) > len(MAGIC) + 1 + blob[len(MAGIC)] + NONCE_BYTES
