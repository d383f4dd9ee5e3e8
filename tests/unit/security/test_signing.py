"""Signed packages: a store with trust serves only what a trusted key signed, whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgegen.errors import IntegrityError
from edgegen.executors import describe_model
from edgegen.security.signing import SIGNATURE_FILE, Signer, Trust
from edgegen.store import ModelStore


def test_signed_packages_open_tampered_and_foreign_ones_do_not(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    signer = Signer.local(tmp_path / "home")
    assert (tmp_path / "home" / "security" / "signing.key").stat().st_mode & 0o777 == 0o600
    assert Signer.local(tmp_path / "home").key_id == signer.key_id  # made once, then reused
    trust = Trust.load([tmp_path / "home" / "security" / "signing.pub"])
    signing = ModelStore(tmp_path / "models", signer=signer, describe=describe_model)
    signing.add(model_files["onnx"], "digits")
    store = ModelStore(tmp_path / "models", trust=trust, describe=describe_model)
    assert store.open("digits").manifest.version == "1"

    unsigned = ModelStore(tmp_path / "models", describe=describe_model).add(
        model_files["onnx"], "digits", activate=False
    )
    with pytest.raises(IntegrityError, match="not signed"):
        store.activate("digits", unsigned.version)
    assert store.active_version("digits") == "1"

    stranger = Signer.local(tmp_path / "elsewhere")
    stranger.sign(tmp_path / "models" / "digits" / unsigned.version)
    with pytest.raises(IntegrityError, match="does not trust"):
        store.open("digits", unsigned.version)

    version_dir = tmp_path / "models" / "digits" / "1"
    manifest = json.loads((version_dir / "manifest.json").read_text())
    manifest["metadata"] = {"changed": True}
    (version_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="does not match"):
        store.open("digits")
    (version_dir / SIGNATURE_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="malformed"):
        store.open("digits")


def test_a_signed_package_directory_keeps_its_signature_under_another_name(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    signer = Signer.local(tmp_path / "home")
    source = ModelStore(tmp_path / "a", signer=signer, describe=describe_model)
    source.add(model_files["onnx"], "digits")
    trust = Trust.load([tmp_path / "home" / "security" / "signing.pub"])
    target = ModelStore(tmp_path / "b", trust=trust, describe=describe_model)
    package = tmp_path / "a" / "digits" / "1"
    target.add(package, "renamed", "7")
    assert target.open("renamed").manifest.version == "7"
    (package / SIGNATURE_FILE).unlink()
    with pytest.raises(IntegrityError, match="not signed"):
        target.add(package, "renamed", "8")
