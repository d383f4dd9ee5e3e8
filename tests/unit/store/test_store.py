from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgegen.errors import IntegrityError, InvalidName, ModelNotFound, StoreError, VersionExists
from edgegen.executors import describe_model
from edgegen.store import Manifest, ModelStore


def test_add_writes_layout_manifest_and_activates_first_version(store: ModelStore) -> None:
    package = store.open("digits")
    assert package.path == store.root / "digits" / "1"
    assert (package.path / "model.onnx").is_file()
    manifest = Manifest.read(package.path / "manifest.json")
    assert manifest.format == "onnx"
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [("input", "float32", (-1, 64))]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", (-1, 10))]
    assert set(manifest.files) == {"model.onnx"}
    assert store.active_version("digits") == "1"


def test_second_version_is_kept_inactive_until_activated(
    store: ModelStore, model_files: dict[str, Path]
) -> None:
    store.add(model_files["onnx"], "digits")
    assert store.versions("digits") == ["1", "2"]
    assert store.active_version("digits") == "1"
    store.activate("digits", "2")
    assert store.active_version("digits") == "2"
    assert store.open("digits", "1").manifest.version == "1"  # previous one stays for rollback


def test_versions_sort_numerically(store: ModelStore, model_files: dict[str, Path]) -> None:
    for version in ("10", "2", "beta"):
        store.add(model_files["onnx"], "digits", version)
    assert store.versions("digits") == ["1", "2", "10", "beta"]
    assert store.next_version("digits") == "11"


def test_existing_version_is_refused(store: ModelStore, model_files: dict[str, Path]) -> None:
    with pytest.raises(VersionExists):
        store.add(model_files["onnx"], "digits", "1")
    assert not [p for p in store.root.iterdir() if p.name.startswith(".staging")]


def test_tampered_file_is_refused_at_open_and_activation(
    store: ModelStore, model_files: dict[str, Path]
) -> None:
    store.add(model_files["onnx"], "digits")
    model = store.root / "digits" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    with pytest.raises(IntegrityError, match="sha256"):
        store.open("digits", "2")
    with pytest.raises(IntegrityError):
        store.activate("digits", "2")
    assert store.active_version("digits") == "1"


def test_malformed_manifest_is_refused(store: ModelStore) -> None:
    path = store.root / "digits" / "1" / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="malformed"):
        store.open("digits")


def test_manifest_listing_a_path_outside_the_package_is_refused(store: ModelStore) -> None:
    path = store.root / "digits" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    data["files"]["../../../etc/passwd"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(IntegrityError):
        store.open("digits")


@pytest.mark.parametrize(
    "name", ["../etc", "..", "a/b", "/abs", "Digits", "", "x" * 65, "a\x00b", "%2e%2e", ".hidden", "-x"]
)
def test_bad_names_never_reach_the_file_system(
    store: ModelStore, name: str, model_files: dict[str, Path]
) -> None:
    with pytest.raises(InvalidName):
        store.open(name)
    with pytest.raises(InvalidName):
        store.add(model_files["onnx"], name)
    with pytest.raises(InvalidName):
        store.activate("digits", name)


def test_symlinked_version_is_refused(store: ModelStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (store.root / "digits" / "9").symlink_to(outside)
    with pytest.raises(StoreError, match="leaves the model store"):
        store.open("digits", "9")


def test_unknown_model_and_version(store: ModelStore) -> None:
    with pytest.raises(ModelNotFound):
        store.open("nope")
    with pytest.raises(ModelNotFound):
        store.open("digits", "7")
    with pytest.raises(ModelNotFound):
        store.versions("nope")


def test_package_directory_is_added_with_its_hashes_checked(
    store: ModelStore, tmp_path: Path, model_files: dict[str, Path]
) -> None:
    package = store.open("digits").path
    other = ModelStore(tmp_path / "other", describe=describe_model)
    manifest = other.add(package, "copied")
    assert (manifest.name, manifest.version) == ("copied", "1")
    assert other.open("copied").manifest.files == store.open("digits").manifest.files

    (tmp_path / "bad").mkdir()
    for f in package.iterdir():
        (tmp_path / "bad" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "bad" / "model.onnx").write_bytes(b"not the model")
    with pytest.raises(IntegrityError):
        other.add(tmp_path / "bad", "bad")


def test_unknown_suffix_and_missing_source(store: ModelStore, tmp_path: Path) -> None:
    weights = tmp_path / "model.pkl"
    weights.write_bytes(b"\x80\x04")
    with pytest.raises(StoreError, match="unknown model format"):
        store.add(weights, "pickled")
    with pytest.raises(StoreError, match="neither"):
        store.add(tmp_path / "missing.onnx", "missing")


def test_list_reports_active_versions(store: ModelStore) -> None:
    listing = {info.name: (info.versions, info.active) for info in store.list()}
    assert listing == {"digits": (["1"], "1"), "digits-tflite": (["1"], "1")}
