"""Wheels of edgegen for the software-upgrade tests: this checkout's code under another version number,
optionally broken, packed as pip installs it (PEP 427: the package, METADATA, WHEEL, entry points, RECORD).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import re
import zipfile
from pathlib import Path

import edgegen

SOURCE = Path(edgegen.__file__).parent


def build_wheel(out: Path, version: str, *, patch: dict[str, str] | None = None) -> Path:
    """edgegen-<version>-py3-none-any.whl in `out`; `patch` replaces the text of files (relative to
    the package) with the text given."""
    patch = patch or {}
    files: dict[str, bytes] = {}
    for path in sorted(SOURCE.rglob("*")):
        relative = path.relative_to(SOURCE).as_posix()
        if path.is_dir() or "__pycache__" in relative or path.suffix == ".pyc":
            continue
        data = patch[relative].encode() if relative in patch else path.read_bytes()
        if relative == "__init__.py":
            data = re.sub(rb'__version__ = "[^"]*"', f'__version__ = "{version}"'.encode(), data)
        files[f"edgegen/{relative}"] = data
    info = f"edgegen-{version}.dist-info"
    metadata = importlib.metadata.distribution("edgegen").read_text("METADATA") or ""
    files[f"{info}/METADATA"] = re.sub(r"(?m)^Version: .*$", f"Version: {version}", metadata).encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: edgegen-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    files[f"{info}/entry_points.txt"] = b"[console_scripts]\nedgegen = edgegen.cli:main\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"edgegen-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return wheel
