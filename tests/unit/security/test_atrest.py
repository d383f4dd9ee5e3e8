"""Encryption at rest: no plaintext in the bytes, a wrong key or a moved blob fails clearly, keys rotate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgegen.errors import ConfigError, IntegrityError
from edgegen.security.atrest import Keyring, is_encrypted, new_key

DATA = b"ONNX model bytes: weights, graph, everything " * 100


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.parse(f"k1:{new_key()}")


def test_round_trip_and_no_plaintext(keyring: Keyring) -> None:
    blob = keyring.encrypt(DATA, b"models/digits/1/model.onnx")
    assert is_encrypted(blob)
    assert b"weights" not in blob
    assert DATA[:16] not in blob
    assert keyring.decrypt(blob, b"models/digits/1/model.onnx") == DATA
    assert keyring.encrypt(DATA) != keyring.encrypt(DATA)  # a fresh nonce each time


def test_a_wrong_key_fails_clearly(keyring: Keyring) -> None:
    blob = keyring.encrypt(DATA)
    other = Keyring.parse(f"k1:{new_key()}")
    with pytest.raises(IntegrityError, match="wrong key, or the data was changed"):
        other.decrypt(blob)
    with pytest.raises(IntegrityError, match="lacks"):
        Keyring.parse(f"k9:{new_key()}").decrypt(blob)


def test_a_moved_or_changed_blob_fails(keyring: Keyring) -> None:
    blob = keyring.encrypt(DATA, b"models/a")
    with pytest.raises(IntegrityError, match="changed"):
        keyring.decrypt(blob, b"models/b")  # the same bytes somewhere else
    flipped = bytearray(blob)
    flipped[-5] ^= 1
    with pytest.raises(IntegrityError, match="changed"):
        keyring.decrypt(bytes(flipped), b"models/a")
    with pytest.raises(IntegrityError, match="not an edgegen encrypted blob"):
        keyring.decrypt(DATA)


def test_keys_rotate_and_old_data_stays_readable() -> None:
    old_key, new = new_key(), new_key()
    before = Keyring.parse(f"2025:{old_key}")
    blob = before.encrypt(DATA, b"ctx")
    after = Keyring.parse(f"2026:{new},2025:{old_key}")  # new key first: it encrypts
    assert after.decrypt(blob, b"ctx") == DATA
    rotated = after.rotate(blob, b"ctx")
    assert Keyring.parse(f"2026:{new}").decrypt(rotated, b"ctx") == DATA
    with pytest.raises(IntegrityError, match="lacks"):
        Keyring.parse(f"2026:{new}").decrypt(blob, b"ctx")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "at least one key"),
        ("nokey", "id:base64"),
        ("k1:not*base64", "not valid base64"),
        ("k1:AAAA", "must be 32 bytes"),
        ("../x:" + "A" * 44, "id:base64"),
    ],
)
def test_bad_keys(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Keyring.parse(text)


def test_duplicate_ids_and_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key()
    with pytest.raises(ConfigError, match="unique"):
        Keyring.parse(f"a:{key}\na:{key}")
    (tmp_path / "keys").write_text(f"a:{key}\n")
    assert Keyring.load(tmp_path / "keys").active == "a"  # type: ignore[union-attr]
    monkeypatch.delenv("EDGEGEN_ENCRYPTION_KEYS", raising=False)
    assert Keyring.load() is None
    monkeypatch.setenv("EDGEGEN_ENCRYPTION_KEYS", f"b:{key}")
    assert Keyring.load().active == "b"  # type: ignore[union-attr]
