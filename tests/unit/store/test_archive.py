"""Package archives: a signed package travels as one file and unpacks only if every member is plain."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from edgegen.errors import StoreError
from edgegen.security.signing import Signer, Trust
from edgegen.store import ModelStore
from edgegen.store.archive import unpacked


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
    with pytest.raises(StoreError, match=why), unpacked(archive):
        pass
    assert not (tmp_path / "evil").exists()


def test_a_zip_symlink_and_a_bomb_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as archive:
        info = zipfile.ZipInfo("model.onnx")
        info.external_attr = 0o120777 << 16  # a symbolic link
        archive.writestr(info, "/etc/passwd")
    with pytest.raises(StoreError, match="link"), unpacked(link):
        pass
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.onnx", b"\0" * (8 << 20))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(StoreError, match="size limit"), unpacked(bomb, max_bytes=1 << 20):
        pass
    with pytest.raises(StoreError, match="not a readable"), unpacked(tmp_path / "missing.tar"):
        pass


def test_a_signed_package_travels_as_an_archive(tmp_path: Path, model_files: dict[str, Path]) -> None:
    signer = Signer.local(tmp_path / "home")
    source = ModelStore(tmp_path / "a", signer=signer)
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
    target = ModelStore(tmp_path / "b", trust=trust)
    assert target.add(archive, "digits").version == "1"
    assert target.add(zipped, "digits").version == "2"
    assert target.open("digits", "2").manifest.files == target.open("digits", "1").manifest.files
