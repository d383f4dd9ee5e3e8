"""Package archives: a signed package travels as one file and unpacks only if every member is plain, into
the store, within bounds on what it writes and what it holds in memory."""

from __future__ import annotations

import io
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from edgegen.errors import InvalidInput, StoreError
from edgegen.executors import describe_model
from edgegen.security.atrest import Keyring, new_key
from edgegen.security.signing import Signer, Trust
from edgegen.store import ModelStore
from edgegen.store.archive import DEFAULT_MAX_BYTES, MIN_LIMIT, pack, unpack_limit, unpacked
from tests.hostile_archives import header, tar_gz_stream


def _tar(path: Path, members: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _file(name: str, size: int = 1) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([_file("../evil")], "unsafe path"),
        ([_file("pkg/../../evil")], "unsafe path"),
        ([_file("/etc/cron.d/evil")], "unsafe path"),
        ([_file("a\\\\..\\\\evil")], "unsafe path"),
        ([_file("C:evil")], "unsafe path"),
        ([_file("a/b/c")], "unsafe path"),
        ([_special("model.onnx", tarfile.SYMTYPE, "/etc/passwd")], "link or a special file"),
        ([_special("model.onnx", tarfile.LNKTYPE, "/etc/passwd")], "link or a special file"),
        ([_special("model.onnx", tarfile.CHRTYPE)], "link or a special file"),
        ([_special("model.onnx", tarfile.FIFOTYPE)], "link or a special file"),
        ([_file("a/x"), _file("b/y")], "one package"),
        ([_file("x"), _file("x")], "twice"),
        ([_file(".hidden")], "plain file name"),
        ([_file(f"f{i}") for i in range(70)], "more than 64"),
    ],
    ids=[
        "dotdot",
        "nested-dotdot",
        "absolute",
        "backslash",
        "drive",
        "deep",
        "symlink",
        "hardlink",
        "device",
        "fifo",
        "two-roots",
        "duplicate",
        "dotfile",
        "too-many",
    ],
)
def test_hostile_tar_members_are_refused(tmp_path: Path, members: list[tarfile.TarInfo], why: str) -> None:
    archive = _tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(StoreError, match=why), unpacked(archive, tmp_path):
        pass
    assert not (tmp_path / "evil").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.tar.gz"]  # the unpacking directory is gone


def test_a_zip_symlink_and_a_bomb_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("model.onnx")
        info.external_attr = 0o120777 << 16  # a symbolic link
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(StoreError, match="link"), unpacked(link, tmp_path):
        pass
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000
    with (
        pytest.raises(StoreError, match="more than its limit of 1048576 bytes"),
        unpacked(bomb, tmp_path, 1 << 20),
    ):
        pass
    with pytest.raises(StoreError, match="not a readable"), unpacked(tmp_path / "missing.tar", tmp_path):
        pass


def test_a_signed_package_travels_as_an_archive(tmp_path: Path, model_files: dict[str, Path]) -> None:
    signer = Signer.local(tmp_path / "home")
    source = ModelStore(tmp_path / "a", signer=signer, describe=describe_model)
    source.add(model_files["onnx"], "digits")
    package = tmp_path / "a" / "digits" / "1"
    archive = tmp_path / "digits-1.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        out.add(package, arcname="digits-1")  # with its directory, as `tar czf` makes it
    zipped = tmp_path / "digits-1.zip"
    with zipfile.ZipFile(zipped, "w") as out:
        for file in package.iterdir():
            out.write(file, file.name)
    trust = Trust.load([tmp_path / "home" / "security" / "signing.pub"])
    target = ModelStore(tmp_path / "b", trust=trust, describe=describe_model)
    assert target.add(archive, "digits").version == "1"
    assert target.add(zipped, "digits").version == "2"
    assert target.open("digits", "2").manifest.files == target.open("digits", "1").manifest.files


def test_an_encrypted_version_packs_as_its_signed_plaintext(
    tmp_path: Path, model_files: dict[str, Path]
) -> None:
    source = ModelStore(
        tmp_path / "a",
        signer=Signer.local(tmp_path / "home"),
        keyring=Keyring.parse(f"k:{new_key()}"),
        describe=describe_model,
    )
    source.add(model_files["onnx"], "digits")
    source.encrypt("digits", "1")
    package = source.open("digits", "1")  # its plaintext lies in memory, named by a /proc/self/fd link
    try:
        pack(package, tmp_path / "digits-1.tar.gz")
        with pytest.raises(StoreError, match="exists already"):
            pack(package, tmp_path / "digits-1.tar.gz")
    finally:
        package.close()
    target = ModelStore(
        tmp_path / "b",
        trust=Trust.load([tmp_path / "home" / "security" / "signing.pub"]),
        describe=describe_model,
    )
    manifest = target.add(tmp_path / "digits-1.tar.gz", "digits")
    received = tmp_path / "b" / "digits" / manifest.version / manifest.model_file
    assert received.read_bytes() == model_files["onnx"].read_bytes()


# -- bounds: what unpacking writes and holds ---------------------------------------------------------
def test_a_gzip_bomb_is_refused_by_its_declared_size_before_a_byte_is_written(tmp_path: Path) -> None:
    bomb = tar_gz_stream(tmp_path / "bomb.tar.gz", [(header("model.onnx", 256 << 20), b"\0")])
    assert bomb.stat().st_size < 1 << 20
    assert unpack_limit(bomb.stat().st_size, DEFAULT_MAX_BYTES) == MIN_LIMIT  # 64 MiB for a small archive
    store = tmp_path / "store"
    store.mkdir()
    declared = r"more than its limit of 67108864 bytes .*declares 268435456"
    with pytest.raises(StoreError, match=declared), unpacked(bomb, store):
        pass
    assert list(store.iterdir()) == []


def test_members_together_may_not_pass_the_limit(tmp_path: Path) -> None:
    archive = tar_gz_stream(
        tmp_path / "two.tar.gz", [(header("a.bin", 600 << 10), b"x"), (header("b.bin", 600 << 10), b"y")]
    )
    with pytest.raises(StoreError, match="declares 614400"), unpacked(archive, tmp_path, 1 << 20):
        pass
    with unpacked(archive, tmp_path, 2 << 20) as package:
        assert package.parent == tmp_path
        assert package.name.startswith(".unpack-")
        assert sorted(p.stat().st_size for p in package.iterdir()) == [600 << 10, 600 << 10]
    assert not package.exists()


@pytest.mark.parametrize(
    "kind",
    [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE],
    ids=["gnu-long-name", "gnu-long-link", "pax", "pax-global"],
)
def test_a_huge_extended_header_is_refused_without_reading_it(tmp_path: Path, kind: bytes) -> None:
    archive = tar_gz_stream(
        tmp_path / "long.tar.gz",
        [(header("././@LongLink", 64 << 20, kind), b"a"), (header("model.onnx", 1), b"x")],
    )
    tracemalloc.start()
    try:
        with (
            pytest.raises(StoreError, match="extended header of 67108864 bytes"),
            unpacked(archive, tmp_path),
        ):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # tarfile alone reads all 64 MiB of the name into memory


def test_a_sparse_member_is_refused(tmp_path: Path) -> None:
    archive = tar_gz_stream(
        tmp_path / "sparse.tar.gz", [(header("model.onnx", 0, tarfile.GNUTYPE_SPARSE), b"")]
    )
    with pytest.raises(StoreError, match="sparse"), unpacked(archive, tmp_path):
        pass


def test_only_gzip_is_decompressed(tmp_path: Path) -> None:
    xz = tmp_path / "package.tar"  # named as a plain tar, holding an xz stream
    with tarfile.open(xz, "w:xz") as archive:
        archive.addfile(_file("model.onnx"), io.BytesIO(b"x"))
    with pytest.raises(InvalidInput, match="not a package archive"), unpacked(xz, tmp_path):
        pass


def test_a_zip_directory_is_checked_before_zipfile_reads_it(tmp_path: Path) -> None:
    crowded = tmp_path / "crowded.zip"
    with zipfile.ZipFile(crowded, "w") as archive:
        for i in range(20_000):
            archive.writestr(f"f{i}", b"")
    tracemalloc.start()
    try:
        with pytest.raises(StoreError, match="more than 64 members"), unpacked(crowded, tmp_path):
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # zipfile would build 20,000 ZipInfo objects first
