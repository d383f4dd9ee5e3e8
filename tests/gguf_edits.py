"""Copies of a GGUF with chosen metadata changed or tensors left out: the bad models of the security tests.

    bad = edited_gguf(write_tiny_llama(tmp / "good.gguf"), tmp / "bad.gguf", {"llama.block_count": 1_000_000})

Metadata and tensors are copied as the `gguf` package reads them (as optimize/lm.py's drop_layers does),
so everything not named stays byte for byte what the tiny llama holds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

# A value and its GGUF type; a bare int is written as a uint32, as the writer's hyperparameters are.
Value = int | str | float | tuple[object, GGUFValueType] | tuple[object, GGUFValueType, GGUFValueType]


def edited_gguf(
    source: Path,
    dest: Path,
    changes: Mapping[str, Value | None],
    *,
    drop_tensors: Collection[str] = (),
) -> Path:
    """Copy `source` to `dest` with each key of `changes` set (or removed, for None), and without the
    tensors in `drop_tensors`; return `dest`."""
    reader = GGUFReader(source)
    arch = changes.get("general.architecture", str(reader.fields["general.architecture"].contents()))
    writer = GGUFWriter(dest, str(arch))  # the writer writes the architecture itself
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF.") or field.name in changes:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for key, value in changes.items():
        if value is None or key == "general.architecture":
            continue
        if isinstance(value, tuple):
            writer.add_key_value(key, value[0], *value[1:])  # type: ignore[arg-type]
        elif isinstance(value, bool | int):
            writer.add_key_value(key, value, GGUFValueType.UINT32)
        elif isinstance(value, float):
            writer.add_key_value(key, value, GGUFValueType.FLOAT32)
        else:
            writer.add_key_value(key, value, GGUFValueType.STRING)
    kept = [t for t in reader.tensors if t.name not in drop_tensors]
    for tensor in kept:
        data = tensor.data
        writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(np.array(tensor.data))  # a copy: the reader maps the file
    writer.close()
    return dest
