"""A model package shipped as one file (`.tar`, `.tar.gz`, `.tgz`, `.zip`): packed from a store's
version, and unpacked refusing every trick.

    pack(store.open("digits", "3"), Path("digits-3.tar.gz"))                     # on one node
    with unpacked(Path("digits-3.tar.gz"), store.root, max_bytes) as package_dir:   # removed after
        store.add(package_dir, "digits")            # then checked like any package directory

A package is flat: `manifest.json`, its signature and the files the manifest names. So every member must
be a regular file whose name is one plain file name (optionally under one leading directory, as `tar czf
pkg.tgz pkg/` makes) — no `..`, no absolute path, no backslash, no drive, no NUL; symbolic and hard links,
devices, FIFOs and sparse files are refused, not skipped; a name may appear once; at most `MAX_MEMBERS`.

What unpacking writes and holds is bounded, whatever the archive claims:

- Where: a fresh directory inside `parent` (the store root, under the node's home), removed afterwards
  whatever happened — never the system's temp directory.
- How much is written: `unpack_limit` — the caller's `max_bytes` (a node's `security.max_pull_bytes`),
  and no more than `MAX_RATIO` times the archive's own size (`MIN_LIMIT` at least). Model weights do not
  compress 64:1; a decompression bomb does (gzip reaches 1000:1). Each member's declared size (its tar
  header, its zip directory entry) is checked against what is left before a byte of it is written, and
  the bytes copied are counted as well, so neither an honest bomb nor a lying header writes past it.
- How much is held: Python's tarfile reads a GNU long name or a pax header into memory whole, at the
  size its header states, so one over `MAX_HEADER_BYTES` is refused before tarfile reads it; GNU sparse
  maps (read whole too) are refused with their members. zipfile reads the central directory whole at
  open, so its size and entry count are checked first. Only gzip is decompressed (told by the first
  bytes, not the name): bzip2 and xz decoders size their memory by what the stream says.
"""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

from edgegen.errors import InvalidInput, StoreError
from edgegen.store.manifest import FILE_PATTERN, SIGNATURE_FILE

if TYPE_CHECKING:
    from edgegen.store.store import ModelPackage

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
MAX_MEMBERS = 64
DEFAULT_MAX_BYTES = 64 << 30  # a large GGUF, with room
MAX_RATIO = 64  # unpacked bytes per archive byte
MIN_LIMIT = 64 << 20  # what any archive may unpack to, however small
MAX_HEADER_BYTES = 4096  # a pax header or GNU long name; a package's names are under 130 bytes
MAX_DIRECTORY_BYTES = 1 << 20  # a zip's central directory: MAX_MEMBERS entries with their names
_CHUNK = 1 << 20
# Headers whose content tarfile reads into memory whole: GNU long name and link, pax (x, g, Solaris X).
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)  # fmt: skip


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


def pack(package: ModelPackage, target: Path) -> None:
    """Write an opened version to a new `target` (.tar.gz; StoreError if it exists): its manifest, its
    signature if it has one, and its model file as plaintext, since encryption at rest stays with the
    node that holds the key. The members sit at the archive's root, as `unpacked` takes them; the
    caller closes `package`."""
    members = {
        "manifest.json": package.path / "manifest.json",
        package.manifest.model_file: package.model_path,
    }
    if (package.path / SIGNATURE_FILE).is_file():
        members[SIGNATURE_FILE] = package.path / SIGNATURE_FILE
    if target.exists():
        raise StoreError(f"{target.name} exists already; nothing was written")
    # dereference: an encrypted version's plaintext is named by /proc/self/fd/N, a link to its memfd,
    # and the file behind the link is what goes in (`unpacked` refuses a link member).
    with tarfile.open(target, "x:gz", dereference=True) as archive:
        for name, source in members.items():
            archive.add(source, arcname=name, recursive=False)


def unpack_limit(archive_size: int, max_bytes: int) -> int:
    """The most an archive of `archive_size` bytes may unpack to.

    >>> unpack_limit(1_000_000, 16 << 30) == MIN_LIMIT
    True
    """
    return min(max_bytes, max(MIN_LIMIT, archive_size * MAX_RATIO))


def _shown(name: str) -> str:
    """A member's name as an error message shows it: a name may be as long as a header allows."""
    return repr(name[:100] + "…" if len(name) > 100 else name)


def _parts(name: str) -> list[str]:
    """A member's path as parts, or StoreError when it is not a plain relative path."""
    if "\\" in name or "\0" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise StoreError(f"archive member {_shown(name)} has an unsafe path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts) or len(parts) > 2:
        raise StoreError(f"archive member {_shown(name)} has an unsafe path")
    return parts


def _member_name(name: str, top: set[str]) -> str:
    """The plain file name a member unpacks to, or StoreError."""
    parts = _parts(name)
    if not parts:
        raise StoreError(f"archive member {_shown(name)} has no name")
    if len(parts) == 2:
        top.add(parts[0])
        if len(top) > 1:
            raise StoreError("a package archive holds one package: files at its root or in one directory")
    if not FILE_PATTERN.fullmatch(parts[-1]):
        raise StoreError(f"archive member {_shown(name)} is not a plain file name")
    return parts[-1]


class _Budget:
    """The bytes still allowed: claimed by each member's declared size before it is written, then
    checked against what is really copied."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    def claim(self, name: str, declared: int) -> None:
        if declared > self.left:
            raise StoreError(
                f"the archive unpacks to more than its limit of {self.limit} bytes "
                f"(member {_shown(name)} declares {declared})"
            )
        self.left -= declared

    def copy(self, source: IO[bytes], dest: Path, declared: int) -> None:
        """Copy exactly `declared` bytes (already claimed), or StoreError."""
        copied = 0
        with dest.open("xb") as out:
            while chunk := source.read(_CHUNK):
                copied += len(chunk)
                if copied > declared:
                    raise StoreError(f"archive member {dest.name!r} holds more than its declared size")
                out.write(chunk)
        if copied != declared:
            raise StoreError(f"archive member {dest.name!r} is shorter than its declared size")


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing what tarfile would otherwise read into memory unbounded."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in _EXTENDED and self.size > MAX_HEADER_BYTES:
            raise StoreError(
                f"the archive has an extended header of {self.size} bytes (names and pax records "
                f"may take {MAX_HEADER_BYTES})"
            )
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise StoreError("the archive holds a sparse file")
        return super()._proc_member(tar)  # type: ignore[misc]  # a private hook typeshed does not declare

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str], tar: Any) -> None:
        # A pax sparse map of format 1.0 lies in the member's data, read whole, at a length it states.
        raise StoreError("the archive holds a sparse file")


def _unpack_tar(archive: Path, mode: Literal["r:", "r:gz"], dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode, tarinfo=_BoundedTarInfo) as tar:
        top: set[str] = set()
        for count, member in enumerate(tar, 1):
            if count > MAX_MEMBERS:
                raise StoreError(f"the archive has more than {MAX_MEMBERS} members")
            if member.isdir():
                _parts(member.name)
                continue
            if not member.isfile() or member.issparse():
                raise StoreError(f"archive member {_shown(member.name)} is a link or a special file")
            name = _member_name(member.name, top)
            budget.claim(member.name, member.size)
            source = tar.extractfile(member)
            if source is None:
                raise StoreError(f"archive member {_shown(member.name)} cannot be read")
            budget.copy(source, dest / name, member.size)


def _check_zip_directory(archive: Path) -> None:
    """Refuse a zip whose central directory zipfile would read into memory at open, if it is large.

    zipfile's own reader of the end record is used (it reads at most 64 KiB), so these are the very
    numbers zipfile goes by, zip64 records included.
    """
    with archive.open("rb") as file:
        end = zipfile._EndRecData(file)  # type: ignore[attr-defined]
    if end is None:
        raise StoreError(f"{archive.name} is not a readable package archive: no zip end record")
    entries, size = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
    if entries > MAX_MEMBERS:
        raise StoreError(f"the archive has more than {MAX_MEMBERS} members")
    if size > MAX_DIRECTORY_BYTES:
        raise StoreError(
            f"the archive's directory of {size} bytes is over the {MAX_DIRECTORY_BYTES}-byte limit"
        )


def _unpack_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    _check_zip_directory(archive)
    with zipfile.ZipFile(archive) as zip_file:
        members = zip_file.infolist()
        if len(members) > MAX_MEMBERS:
            raise StoreError(f"the archive has more than {MAX_MEMBERS} members")
        top: set[str] = set()
        for info in members:
            if info.is_dir():
                continue
            if (info.external_attr >> 16) & 0o170000 not in (0, 0o100000):  # a symlink or a device
                raise StoreError(f"archive member {_shown(info.filename)} is a link or a special file")
            name = _member_name(info.filename, top)
            budget.claim(info.filename, info.file_size)
            with zip_file.open(info) as source:
                budget.copy(source, dest / name, info.file_size)


@contextlib.contextmanager
def unpacked(archive: Path, parent: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Path]:
    """The archive's files in a fresh directory inside `parent` (removed afterwards), having written at
    most `unpack_limit(archive size, max_bytes)` bytes; or StoreError (InvalidInput: not an archive)."""
    dest = Path(tempfile.mkdtemp(prefix=".unpack-", dir=parent))
    try:
        try:
            budget = _Budget(unpack_limit(archive.stat().st_size, max_bytes))
            kind = archive_kind(archive)
            if kind == ".zip":
                _unpack_zip(archive, dest, budget)
            else:
                _unpack_tar(archive, "r:gz" if kind == ".tar.gz" else "r:", dest, budget)
        except FileExistsError:
            raise StoreError(f"{archive.name} holds a file twice") from None
        except OSError as exc:  # its strerror, if any: the full message may name a path
            raise StoreError(
                f"{archive.name} is not a readable package archive: {exc.strerror or exc}"
            ) from None
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
            raise StoreError(f"{archive.name} is not a readable package archive: {exc}") from None
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)
