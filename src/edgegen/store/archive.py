"""Unpack a model package shipped as one file (`.tar`, `.tar.gz`, `.tgz`, `.zip`), refusing every trick.

    with unpacked(Path("digits-3.tar.gz")) as package_dir:   # a temporary directory, removed after
        store.add(package_dir, "digits")                     # then checked like any package directory

A package is flat: `manifest.json`, its signature and the files the manifest names. So every member must
be a regular file whose name is one plain file name (optionally under one leading directory, as `tar czf
pkg.tgz pkg/` makes) — no `..`, no absolute path, no backslash, no drive, no NUL; symbolic and hard links,
devices and FIFOs are refused, not skipped; a name may appear once. Sizes are bounded before anything is
written (`max_bytes` in all, `MAX_MEMBERS` members), and bytes are copied with the bound enforced on what
is actually read, so a lying header or a decompression bomb stops at the limit.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from edgegen.errors import InvalidInput, StoreError
from edgegen.store.manifest import FILE_PATTERN

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_MEMBERS = 64
DEFAULT_MAX_BYTES = 64 << 30  # a large GGUF, with room


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def archive_kind(path: Path) -> str:
    """The suffix of the archive `path` holds, told by its first bytes (gzip, zip, POSIX tar), or
    InvalidInput: a file sent with no name to go by."""
    with path.open("rb") as file:
        head = file.read(262)
    if head.startswith(b"\x1f\x8b"):
        return ".tar.gz"
    if head.startswith(b"PK\x03\x04"):
        return ".zip"
    if head[257:262] == b"ustar":
        return ".tar"
    raise InvalidInput(f"not a package archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _parts(name: str) -> list[str]:
    """A member's path as parts, or StoreError when it is not a plain relative path."""
    if "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise StoreError(f"archive member {name!r} has an unsafe path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or len(parts) > 2:
        raise StoreError(f"archive member {name!r} has an unsafe path")
    return parts


def _member_name(name: str, top: set[str]) -> str:
    """The plain file name a member unpacks to, or StoreError."""
    parts = _parts(name)
    if not parts:
        raise StoreError(f"archive member {name!r} has no name")
    if len(parts) == 2:
        top.add(parts[0])
        if len(top) > 1:
            raise StoreError("a package archive holds one package: files at its root or in one directory")
    if not FILE_PATTERN.fullmatch(parts[-1]):
        raise StoreError(f"archive member {name!r} is not a plain file name")
    return parts[-1]


def _copy(source: IO[bytes], dest: Path, budget: list[int]) -> None:
    with dest.open("xb") as out:
        while chunk := source.read(1 << 20):
            budget[0] -= len(chunk)
            if budget[0] < 0:
                raise StoreError("the archive unpacks to more than the size limit")
            out.write(chunk)


def _unpack_tar(archive: Path, dest: Path, budget: list[int]) -> None:
    with tarfile.open(archive, "r:*") as tar:
        top: set[str] = set()
        for count, member in enumerate(tar, 1):
            if count > MAX_MEMBERS:
                raise StoreError(f"the archive has more than {MAX_MEMBERS} members")
            if member.isdir():
                _parts(member.name)
                continue
            if not member.isfile():
                raise StoreError(f"archive member {member.name!r} is a link or a special file")
            name = _member_name(member.name, top)
            source = tar.extractfile(member)
            if source is None:
                raise StoreError(f"archive member {member.name!r} cannot be read")
            _copy(source, dest / name, budget)


def _unpack_zip(archive: Path, dest: Path, budget: list[int]) -> None:
    with zipfile.ZipFile(archive) as zip_file:
        members = zip_file.infolist()
        if len(members) > MAX_MEMBERS:
            raise StoreError(f"the archive has more than {MAX_MEMBERS} members")
        top: set[str] = set()
        for info in members:
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):  # a symlink or a device
                raise StoreError(f"archive member {info.filename!r} is a link or a special file")
            name = _member_name(info.filename, top)
            with zip_file.open(info) as source:
                _copy(source, dest / name, budget)


@contextlib.contextmanager
def unpacked(archive: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Path]:
    """The archive's files in a fresh temporary directory (removed afterwards), or StoreError."""
    dest = Path(tempfile.mkdtemp(prefix="edgegen-package-"))
    try:
        budget = [max_bytes]
        try:
            if archive.name.lower().endswith(".zip"):
                _unpack_zip(archive, dest, budget)
            else:
                _unpack_tar(archive, dest, budget)
        except FileExistsError:
            raise StoreError(f"{archive.name} holds a file twice") from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as exc:
            raise StoreError(f"{archive.name} is not a readable package archive: {exc}") from None
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)
