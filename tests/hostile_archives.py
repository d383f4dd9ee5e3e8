"""Package archives built member by member as they are compressed, so a test can make one whose
content is far larger than it could hold: a decompression bomb, a gigantic GNU long name.

    bomb = tar_gz_stream(tmp / "bomb.tar.gz", [(header("model.onnx", 1 << 30), b"\\0")])   # about 1 MB
"""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

_CHUNK = 1 << 20


def header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """A tar header of any type (a regular file, a GNU long name, a pax header, …) claiming `size`."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.type = kind
    return info


def tar_gz_stream(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    """A tar.gz of `members`: each header, then its content as `fill` repeated to its size, then the
    padding; never more than a megabyte of it in memory."""
    with gzip.open(path, "wb", compresslevel=6) as out:
        for info, fill in members:
            out.write(info.tobuf(tarfile.GNU_FORMAT))
            chunk = (fill * _CHUNK)[:_CHUNK]
            left = info.size
            while left:
                out.write(chunk[: min(left, _CHUNK)])
                left -= min(left, _CHUNK)
            out.write(bytes(-info.size % tarfile.BLOCKSIZE))
        out.write(bytes(2 * tarfile.BLOCKSIZE))  # the end of the archive
    return path
