"""Model files encrypted at rest: ciphertext on disk, the verified plaintext only in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgegen.errors import IntegrityError
from edgegen.executors import describe_model, load_executor
from edgegen.security.atrest import Keyring, new_key
from edgegen.store import ModelStore


def keyring(*ids: str) -> Keyring:
    return Keyring.parse(",".join(f"{key_id}:{new_key()}" for key_id in ids))


def test_an_encrypted_model_is_ciphertext_on_disk_and_runs_from_memory(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    keys = keyring("k1")
    store = ModelStore(tmp_path / "models", keyring=keys, describe=describe_model)
    manifest = store.add(model_files["onnx"], "digits")
    on_disk = (tmp_path / "models" / "digits" / "1" / "model.onnx").read_bytes()
    plain = model_files["onnx"].read_bytes()
    assert on_disk.startswith(b"EGENC1\x02k1")  # magic, key id length, key id
    assert plain[:64] not in on_disk
    assert b"logits" in plain
    assert b"logits" not in on_disk  # the graph's names are not readable either

    package = store.open("digits")
    try:
        assert str(package.model_path).startswith("/proc/self/fd/")
        assert package.model_path.read_bytes() == plain
        executor = load_executor(package.model_path, "onnx")
        x = np.zeros((1, 64), np.float32)
        want = load_executor(model_files["onnx"], "onnx").run({"input": x})["logits"]
        np.testing.assert_array_equal(executor.run({"input": x})["logits"], want)
    finally:
        package.close()
    assert (
        manifest.files["model.onnx"]
        == ModelStore(tmp_path / "plain", describe=describe_model)
        .add(model_files["onnx"], "d")
        .files["model.onnx"]
    )  # the manifest describes the plaintext


def test_a_wrong_or_missing_key_fails_clearly(tmp_path: Path, model_files: dict[str, Path]) -> None:
    ModelStore(tmp_path / "models", keyring=keyring("k1"), describe=describe_model).add(
        model_files["onnx"], "digits"
    )
    with pytest.raises(IntegrityError, match="no encryption key"):
        ModelStore(tmp_path / "models", describe=describe_model).open("digits")
    with pytest.raises(IntegrityError, match="lacks"):
        ModelStore(tmp_path / "models", keyring=keyring("k2"), describe=describe_model).open("digits")
    other_k1 = keyring("k1")  # the same id, another secret
    with pytest.raises(IntegrityError, match="wrong key, or the data was changed"):
        ModelStore(tmp_path / "models", keyring=other_k1, describe=describe_model).open("digits")


def test_encrypt_in_place_and_rotate(tmp_path: Path, model_files: dict[str, Path]) -> None:
    ModelStore(tmp_path / "models", describe=describe_model).add(
        model_files["tflite"], "digits"
    )  # stored plain
    k1 = new_key()
    store = ModelStore(tmp_path / "models", keyring=Keyring.parse(f"k1:{k1}"), describe=describe_model)
    assert store.encrypt("digits", "1") == 1
    path = tmp_path / "models" / "digits" / "1" / "model.tflite"
    assert path.read_bytes().startswith(b"EGENC1\x02k1")
    rotated = Keyring.parse(f"k2:{new_key()},k1:{k1}")  # a new key first: it encrypts, k1 still reads
    ModelStore(tmp_path / "models", keyring=rotated, describe=describe_model).encrypt("digits", "1")
    assert path.read_bytes().startswith(b"EGENC1\x02k2")
    package = ModelStore(tmp_path / "models", keyring=rotated, describe=describe_model).open("digits")
    assert package.model_path.read_bytes() == model_files["tflite"].read_bytes()
    package.close()
    # a blob moved to another model's place does not decrypt (its path is authenticated)
    ModelStore(tmp_path / "models", keyring=rotated, describe=describe_model).add(
        model_files["tflite"], "other"
    )
    moved = tmp_path / "models" / "other" / "1" / "model.tflite"
    moved.write_bytes(path.read_bytes())
    with pytest.raises(IntegrityError, match="wrong key, or the data was changed"):
        ModelStore(tmp_path / "models", keyring=rotated, describe=describe_model).open("other")
