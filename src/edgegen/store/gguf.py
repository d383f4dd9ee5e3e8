"""A strict, bounded reader of GGUF files: refuse a malformed file before llama.cpp ever parses it.

llama.cpp trusted the lengths and offsets in a GGUF header and crashed on crafted files, so every length
here is checked against the bytes left in the file before anything is read or allocated, and only the
header is read: tensor data is located and bounds-checked, never loaded.

The byte layout (GGUF versions 2 and 3; little-endian only, as llama.cpp on x86/ARM reads it):

    header        4 bytes   magic b"GGUF"
                  uint32    version: 2 or 3 (1 had 32-bit counts; 3 only added big-endian files)
                  uint64    tensor_count
                  uint64    metadata_kv_count
    metadata kv   string    key                 string = uint64 byte length + UTF-8 bytes, no NUL
    (× kv_count)  uint32    value type          0 uint8, 1 int8, 2 uint16, 3 int16, 4 uint32, 5 int32,
                                                6 float32, 7 bool, 8 string, 9 array, 10 uint64,
                                                11 int64, 12 float64
                  …         value               array = uint32 item type + uint64 count + items
    tensor info   string    name
    (× tensors)   uint32    n_dims              1..4
                  uint64    dims[n_dims]        ggml order: dims[0] is the row length (innermost)
                  uint32    ggml type           see GGML_TYPES
                  uint64    offset              from the start of the data section
    padding                 to a multiple of `general.alignment` (uint32, default 32)
    data                    a tensor is elements / block_size blocks of type_size bytes, at its offset

    >>> info = read_gguf(Path("model.gguf"))                       # doctest: +SKIP
    >>> info.metadata["general.architecture"], len(info.tensors)   # doctest: +SKIP
    ('llama', 272)
"""

from __future__ import annotations

import math
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from edgegen.errors import IntegrityError, StoreError
from edgegen.store.manifest import TensorSpec

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Real models hold a few thousand tensors and a few dozen keys; far larger counts are a crafted header.
MAX_TENSORS = 65_536
MAX_KV = 65_536
MAX_KEY_BYTES = 65_535  # the GGUF spec's limit on a key
MAX_STRING_BYTES = 16 << 20  # a chat template is kilobytes; this bounds one allocation
MAX_NAME_BYTES = 63  # llama.cpp keeps tensor names in a 64-byte, NUL-terminated buffer (GGML_MAX_NAME)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**63 - 1  # ggml counts elements in an int64
MAX_NESTING = 8  # arrays of arrays; llama.cpp itself reads none
MAX_KEPT_ITEMS = 64  # longer arrays (the token list, merges) are kept as their length only

# value type id → (name, struct code); strings (8) and arrays (9) have their own readers
_SCALARS: dict[int, tuple[str, str]] = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    7: ("bool", "B"),  # read as a byte so that anything but 0 or 1 can be refused
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
_UINT32, _BOOL, _STRING, _ARRAY = 4, 7, 8, 9
_STRUCTS = {t: struct.Struct("<" + code) for t, (_, code) in _SCALARS.items()}
_VALUE_NAMES = {**{t: name for t, (name, _) in _SCALARS.items()}, _STRING: "string", _ARRAY: "array"}
# The fewest bytes one item of each type takes, to refuse an array count the file could not hold.
_MIN_ITEM_BYTES = {**{t: s.size for t, s in _STRUCTS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # a 1-byte key, its value type and a uint8
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # a 1-byte name, n_dims, one dim, the type and the offset
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")
_ARRAY_HEAD = struct.Struct("<IQ")


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# ggml type id → layout, as ggml.c's type_traits (ids 4, 5 and 31-33 were removed upstream).
# tests/unit/store/test_gguf.py checks this table against the `gguf` package's GGML_QUANT_SIZES.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
    40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
}


@dataclass(frozen=True)
class ElidedArray:
    """An array longer than MAX_KEPT_ITEMS (a token list, merges), kept as its item type and length."""

    item_type: str
    length: int


MetadataValue = int | float | bool | str | list["MetadataValue"] | ElidedArray


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order, as stored: shape[0] is the row length
    type_name: str  # a GGML_TYPES name: "F32", "Q4_1", …
    offset: int  # from GGUFInfo.data_offset
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    metadata: dict[str, MetadataValue]
    tensors: tuple[TensorInfo, ...]
    data_offset: int  # where the data section starts in the file
    file_size: int
    # the item type of each top-level array ("int32", "string", …): llama.cpp reads some arrays as
    # raw C arrays of one type, and a short array keeps only its values in `metadata`
    array_types: dict[str, str] = field(default_factory=dict)


class _Cursor:
    """Reads a file front to back in bounded chunks, refusing any read past its end.

    `what` names the field being read, so that an error says which one the file lacks.
    """

    _CHUNK = 1 << 16

    def __init__(self, f: BinaryIO, size: int) -> None:
        self._f = f
        self.size = size
        self._buf = b""
        self._base = 0  # file offset of _buf[0]; the file position is always _base + len(_buf)
        self._pos = 0

    @property
    def offset(self) -> int:
        return self._base + self._pos

    @property
    def left(self) -> int:
        return self.size - self.offset

    def _ensure(self, n: int, what: str) -> None:
        if n > self.left:
            raise IntegrityError(
                f"GGUF file is truncated: {what} needs {n} bytes at offset {self.offset}, {self.left} left"
            )
        if self._pos + n > len(self._buf):
            rest = self._buf[self._pos :]
            # n <= left, so this never reads past the size taken at open, whatever a length field claims
            more = self._f.read(min(max(n - len(rest), self._CHUNK), self.size - self._base - len(self._buf)))
            self._base, self._buf, self._pos = self._base + self._pos, rest + more, 0
            if len(self._buf) < n:
                raise IntegrityError("GGUF file changed size while it was being read")

    def take(self, n: int, what: str) -> bytes:
        self._ensure(n, what)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def unpack(self, layout: struct.Struct, what: str) -> tuple[Any, ...]:
        self._ensure(layout.size, what)
        values = layout.unpack_from(self._buf, self._pos)
        self._pos += layout.size
        return values

    def u32(self, what: str) -> int:
        return int(self.unpack(_U32, what)[0])

    def u64(self, what: str) -> int:
        return int(self.unpack(_U64, what)[0])

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise IntegrityError(f"{what} runs past the end of the GGUF file")
        if self._pos + n <= len(self._buf):
            self._pos += n
        else:
            self._base, self._buf, self._pos = self.offset + n, b"", 0
            self._f.seek(self._base)

    def string_length(self, what: str, limit: int) -> int:
        n = self.u64(f"the length of {what}")
        if n > self.left:
            raise IntegrityError(
                f"{what}: string length {n} runs past the end of the GGUF file ({self.left} bytes left)"
            )
        if n > limit:
            raise IntegrityError(f"{what}: string of {n} bytes is over the {limit}-byte limit")
        return n

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` strings, checked as `skip(string_length(...))` checks each one. A string wholly in
        the buffer is stepped over without naming it (a token list has ~50,000: formatting each item's
        name cost a node's start 0.2 s); any other goes the named, checked way."""
        buf, pos = self._buf, self._pos
        for i in range(count):
            if pos + 8 <= len(buf):
                n = _U64.unpack_from(buf, pos)[0]
                if n <= MAX_STRING_BYTES and pos + 8 + n <= len(buf):
                    pos += 8 + n
                    continue
            self._pos = pos
            item = f"{what}[{i}]"
            self.skip(self.string_length(item, MAX_STRING_BYTES), item)
            buf, pos = self._buf, self._pos
        self._pos = pos

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        raw = self.take(self.string_length(what, limit), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise IntegrityError(f"{what} is not valid UTF-8") from None


def read_gguf(path: Path) -> GGUFInfo:
    """Parse and check the header, metadata and tensor table of a GGUF file; read no tensor data.

    Raises IntegrityError naming the first problem found, StoreError if the file cannot be read.

    >>> info = read_gguf(Path("tiny.gguf"))                       # doctest: +SKIP
    >>> info.tensors[0]                                           # doctest: +SKIP
    TensorInfo(name='token_embd.weight', shape=(64, 256), type_name='Q8_0', offset=0, nbytes=17408)
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise StoreError("the GGUF model is not a regular file")
            return _parse(_Cursor(f, st.st_size))
    except OSError as exc:
        raise StoreError(f"cannot read the GGUF file: {exc.strerror}") from None


def _parse(cur: _Cursor) -> GGUFInfo:
    magic, version, n_tensors, n_kv = cur.unpack(_HEADER, "the header")
    if magic != MAGIC:
        raise IntegrityError(f"not a GGUF file: it starts with {magic!r}, not {MAGIC!r}")
    # The magic reads the same in either byte order; a byte-swapped version is how big-endian files show.
    if version not in VERSIONS and int.from_bytes(_U32.pack(int(version)), "big") in VERSIONS:
        raise IntegrityError("GGUF file is big-endian: only little-endian files are supported")
    if version not in VERSIONS:
        raise IntegrityError(f"GGUF version {version} is not supported: only versions 2 and 3 are")
    if n_tensors > MAX_TENSORS or n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left:
        raise IntegrityError(f"GGUF header claims {n_tensors} tensors, more than the file could hold")
    if n_kv > MAX_KV or n_kv * _MIN_KV_BYTES > cur.left:
        raise IntegrityError(f"GGUF header claims {n_kv} metadata entries, more than the file could hold")

    metadata: dict[str, MetadataValue] = {}
    array_types: dict[str, str] = {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(int(n_kv)):
        key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if not key:
            raise IntegrityError(f"metadata key #{i} is empty")
        if key in metadata:
            raise IntegrityError(f"metadata key {key[:64]!r} appears twice")
        what = f"metadata value {key[:64]!r}"
        vtype = cur.u32(f"the type of {what}")
        if key == "general.alignment":
            # llama.cpp reads the alignment asserting that it is a uint32: any other type aborts the process.
            if vtype != _UINT32:
                raise IntegrityError(
                    f"general.alignment must be a uint32, not {_VALUE_NAMES.get(vtype, vtype)}"
                )
            metadata[key] = alignment = cur.u32(what)
        elif vtype == _ARRAY:
            array_types[key], metadata[key] = _array(cur, what, depth=1)
        else:
            metadata[key] = _value(cur, vtype, what)
    if alignment == 0 or alignment & (alignment - 1):
        raise IntegrityError(f"general.alignment must be a power of two, not {alignment}")

    tensors = [_tensor_info(cur, i, alignment) for i in range(int(n_tensors))]
    names = Counter(t.name for t in tensors)
    if duplicate := next((name for name, count in names.items() if count > 1), None):
        raise IntegrityError(f"tensor {duplicate!r} appears twice")
    data_offset = -(-cur.offset // alignment) * alignment
    _check_data(tensors, data_offset, cur.size)
    return GGUFInfo(int(version), metadata, tuple(tensors), data_offset, cur.size, array_types)


def _value(cur: _Cursor, vtype: int, what: str) -> MetadataValue:
    """A scalar or string value (arrays have `_array`)."""
    if vtype in _STRUCTS:
        (value,) = cur.unpack(_STRUCTS[vtype], what)
        return _bool(value, what) if vtype == _BOOL else value
    if vtype == _STRING:
        return cur.string(what)
    raise IntegrityError(f"{what} has unknown value type {vtype}")


def _bool(value: int | float, what: str) -> bool:
    if value not in (0, 1):
        raise IntegrityError(f"{what}: bool byte {value} is neither 0 nor 1")
    return bool(value)


def _array(cur: _Cursor, what: str, depth: int) -> tuple[str, list[MetadataValue] | ElidedArray]:
    """The array's item type name and its items (or its length, when long)."""
    if depth > MAX_NESTING:
        raise IntegrityError(f"{what}: arrays are nested more than {MAX_NESTING} deep")
    item_type, count = (int(v) for v in cur.unpack(_ARRAY_HEAD, f"the array header of {what}"))
    if item_type not in _MIN_ITEM_BYTES:
        raise IntegrityError(f"{what} is an array of unknown value type {item_type}")
    type_name = _VALUE_NAMES[item_type]
    if count * _MIN_ITEM_BYTES[item_type] > cur.left:
        raise IntegrityError(f"{what}: array of {count} {type_name} items runs past the end of the GGUF file")
    keep = count <= MAX_KEPT_ITEMS
    if item_type in _SCALARS:
        code = _SCALARS[item_type][1]
        raw = cur.take(count * _MIN_ITEM_BYTES[item_type], what)
        if item_type == _BOOL and raw.translate(None, b"\x00\x01"):
            raise IntegrityError(f"{what}: a bool byte is neither 0 nor 1")
        if not keep:
            return type_name, ElidedArray(type_name, count)
        values = struct.unpack(f"<{count}{code}", raw)
        return type_name, [bool(v) for v in values] if item_type == _BOOL else list(values)
    if item_type == _STRING:
        if keep:
            return type_name, [cur.string(f"{what}[{i}]") for i in range(count)]
        cur.skip_strings(count, what)
        return type_name, ElidedArray(type_name, count)
    items: list[MetadataValue] = []
    for i in range(count):
        _, item = _array(cur, f"{what}[{i}]", depth + 1)
        if keep:
            items.append(item)
    return type_name, items if keep else ElidedArray(type_name, count)


def _tensor_info(cur: _Cursor, i: int, alignment: int) -> TensorInfo:
    name = cur.string(f"the name of tensor #{i}", MAX_NAME_BYTES)
    if not name:
        raise IntegrityError(f"tensor #{i} has an empty name")
    what = f"tensor {name!r}"
    n_dims = cur.u32(f"the dimension count of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise IntegrityError(f"{what} has {n_dims} dimensions: ggml tensors have 1 to {MAX_DIMS}")
    shape = tuple(int(d) for d in cur.unpack(struct.Struct(f"<{n_dims}Q"), f"the dimensions of {what}"))
    if min(shape) < 1:
        raise IntegrityError(f"{what} has a dimension of 0: {list(shape)}")
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS:
        raise IntegrityError(f"{what} has {elements} elements, more than ggml can count")
    type_id = cur.u32(f"the type of {what}")
    ggml_type = GGML_TYPES.get(type_id)
    if ggml_type is None:
        raise IntegrityError(f"{what} has unknown ggml type {type_id}")
    # ggml quantizes row by row, so a row (dims[0]) must hold whole blocks.
    if shape[0] % ggml_type.block_size:
        raise IntegrityError(
            f"{what}: a row of {shape[0]} elements is not a whole number of "
            f"{ggml_type.name} blocks of {ggml_type.block_size}"
        )
    offset = cur.u64(f"the offset of {what}")
    if offset % alignment:
        raise IntegrityError(f"{what}: offset {offset} is not a multiple of the alignment {alignment}")
    nbytes = elements // ggml_type.block_size * ggml_type.type_size
    return TensorInfo(name, shape, ggml_type.name, offset, nbytes)


def _check_data(tensors: list[TensorInfo], data_offset: int, file_size: int) -> None:
    end_of_previous, previous = 0, ""
    for t in sorted(tensors, key=lambda t: t.offset):
        if data_offset + t.offset + t.nbytes > file_size:
            raise IntegrityError(
                f"tensor {t.name!r}: its {t.nbytes} bytes at data offset {t.offset} "
                "run past the end of the GGUF file"
            )
        if t.offset < end_of_previous:
            raise IntegrityError(f"tensors {previous!r} and {t.name!r} overlap")
        end_of_previous, previous = t.offset + t.nbytes, t.name


def describe(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, object]]:
    """Read a GGUF language model's manifest entries: inputs, outputs and the facts worth recording.

    The model is checked as llama.cpp will build it (store/gguf_hparams.py), so a file that would
    crash the loader never gets a manifest.

    >>> inputs, outputs, facts = describe(Path("model.gguf"))     # doctest: +SKIP
    >>> outputs[0].shape, facts["context_length"]                 # doctest: +SKIP
    ((-1, 49152), 8192)
    """
    # gguf_hparams builds on this module's types, so it is imported here rather than at the top.
    from edgegen.store.gguf_hparams import check_language_model

    info = read_gguf(path)
    shape = check_language_model(info)
    meta = info.metadata
    bytes_by_type: Counter[str] = Counter()
    for t in info.tensors:
        bytes_by_type[t.type_name] += t.nbytes
    facts: dict[str, object | None] = {
        "architecture": shape.architecture,
        "model_name": _fact(meta, "general.name", str),
        "context_length": shape.n_ctx_train,
        "embedding_length": shape.n_embd,
        "block_count": shape.n_layer,
        "vocab_size": shape.n_vocab,
        "tokenizer": _fact(meta, "tokenizer.ggml.model", str),
        "bos_token_id": _fact(meta, "tokenizer.ggml.bos_token_id", int),
        "eos_token_id": _fact(meta, "tokenizer.ggml.eos_token_id", int),
        "chat_template": _fact(meta, "tokenizer.chat_template", str),
        "file_type": _fact(meta, "general.file_type", int),  # llama.cpp's llama_ftype number
        "quantization": bytes_by_type.most_common(1)[0][0],  # the type holding most of the bytes
        "parameter_count": sum(t.n_elements for t in info.tensors),
        "tensor_count": len(info.tensors),
        "gguf_version": info.version,
    }
    inputs = [TensorSpec(name="tokens", dtype="int32", shape=(-1,))]
    outputs = [TensorSpec(name="logits", dtype="float32", shape=(-1, shape.n_vocab))]
    return inputs, outputs, {key: value for key, value in facts.items() if value is not None}


def _fact(meta: dict[str, MetadataValue], key: str, kind: type[int] | type[str]) -> object | None:
    value = meta.get(key)
    if value is None:
        return None
    # bool is an int to Python, but never a count or an id in GGUF
    if not isinstance(value, kind) or isinstance(value, bool):
        raise IntegrityError(f"GGUF metadata {key} should be a {kind.__name__}, not {type(value).__name__}")
    return value
