"""`manifest.json`: what a model package holds, and how to check it.

    {
      "name": "digits", "version": "1", "format": "onnx", "task": "classification",
      "inputs":  [{"name": "input",  "dtype": "float32", "shape": [-1, 64]}],
      "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
      "files": {"model.onnx": "<sha256 hex>"},
      "created": "2026-11-27T12:00:00Z", "producer": "edgegen 0.1.0", "metadata": {...}
    }

A shape entry of -1 is a dimension the model accepts at any size (the batch dimension, usually).
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgegen.errors import IntegrityError, InvalidName

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
FILE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SIGNATURE_FILE = "manifest.sig"  # security/signing.py: Ed25519 over the manifest
ENCRYPTED_MAGIC = b"EGENC1"  # how a file encrypted at rest begins (security/atrest.py)
MODEL_FILES = {"onnx": "model.onnx", "tflite": "model.tflite", "gguf": "model.gguf"}
Format = Literal["onnx", "tflite", "gguf"]


def check_name(value: str, what: str = "model name") -> str:
    """Return `value` if it is a valid model name or version, else raise InvalidName.

    >>> check_name("digits")
    'digits'
    """
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidName(
            f"invalid {what} {value!r}: use 1-64 characters of a-z, 0-9, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    dtype: str
    shape: tuple[int, ...]

    @field_validator("shape")
    @classmethod
    def _dims(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < -1 for d in shape):
            raise ValueError("dimensions are sizes >= 0, or -1 for any size")
        return shape

    @property
    def batched(self) -> bool:
        """True when the first dimension takes any size, so requests can be stacked along it."""
        return len(self.shape) > 0 and self.shape[0] == -1


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    version: str
    format: Format
    task: str = "classification"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    files: dict[str, str]
    created: str = Field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    producer: str = "edgegen"
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name", "version")
    @classmethod
    def _name(cls, value: str) -> str:
        check_name(value)
        return value

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        for file, digest in files.items():
            if not FILE_PATTERN.fullmatch(file):
                raise ValueError(f"file name {file!r} is not a plain file name")
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 of {file!r} is not 64 hex digits")
        return files

    @property
    def model_file(self) -> str:
        return MODEL_FILES[self.format]

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            manifest = cls.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            raise IntegrityError("package has no manifest.json") from None
        except ValidationError as exc:
            raise IntegrityError(f"manifest.json is malformed: {exc.errors()[0]['msg']}") from None
        if manifest.model_file not in manifest.files:
            raise IntegrityError(f"manifest.json does not list {manifest.model_file}")
        return manifest

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
