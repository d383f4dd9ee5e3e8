"""The GGUF reader: files from the `gguf` package's writer read back exactly; crafted files are refused."""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from hypothesis import given, settings
from hypothesis import strategies as st

from edgegen.errors import IntegrityError, StoreError
from edgegen.store.gguf import GGML_TYPES, MAX_NESTING, ElidedArray, describe, read_gguf
from tests.gguf_edits import edited_gguf
from tests.llm_models import BOS_ID, CHATML_TEMPLATE, EOS_ID, write_tiny_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
TOKENS = [f"tok{i}" for i in range(100)]  # over 64 items, so kept as its length only
# name → (numpy array as written, ggml type). A quantized tensor is given as its raw blocks, one row of
# 64 elements being 2 blocks of 32: 68 bytes for Q8_0, 40 for Q4_1.
TENSORS: dict[str, tuple[np.ndarray, GGMLQuantizationType | None]] = {
    "token_embd.weight": (np.arange(256, dtype=np.float32).reshape(8, 32), None),
    "output_norm.weight": (np.linspace(-1, 1, 32, dtype=np.float16), None),
    "blk.0.attn_q.weight": (np.arange(16 * 68).astype(np.uint8).reshape(16, 68), GGMLQuantizationType.Q8_0),
    "blk.0.attn_k.weight": (np.arange(4 * 40).astype(np.uint8).reshape(4, 40), GGMLQuantizationType.Q4_1),
}
# Refusals of a file cut short: whichever field the cut lands in, the message says the bytes ran out.
RAN_OUT = "truncated|past the end|could hold"


# -- files written by the gguf package -------------------------------------------------------------
def write_model(path: Path, endianess: GGUFEndian = GGUFEndian.LITTLE) -> Path:
    """A tiny llama-style GGUF: metadata of every value type and one tensor of each of four ggml types."""
    writer = GGUFWriter(path, "llama", endianess=endianess)
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(32)
    writer.add_block_count(2)
    writer.add_file_type(3)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_uint8("test.u8", 255)
    writer.add_int8("test.i8", -128)
    writer.add_uint16("test.u16", 65535)
    writer.add_int16("test.i16", -32768)
    writer.add_uint32("test.u32", 2**32 - 1)
    writer.add_int32("test.i32", -(2**31))
    writer.add_uint64("test.u64", 2**64 - 1)
    writer.add_int64("test.i64", -(2**63))
    writer.add_float32("test.f32", 0.5)
    writer.add_float64("test.f64", -1.25)
    writer.add_bool("test.bool", True)
    writer.add_string("test.str", "héllo")
    writer.add_array("test.floats", [1.5, 2.5])
    writer.add_array("test.bools", [True, False])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_array("test.long_ints", list(range(65)))
    for name, (array, ggml_type) in TENSORS.items():
        writer.add_tensor(name, array, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_metadata_of_every_value_type_reads_back_exactly(model: Path) -> None:
    meta = read_gguf(model).metadata
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["tokenizer.ggml.tokens"] == ElidedArray("string", len(TOKENS))
    assert {k: v for k, v in meta.items() if k.startswith("test.")} == {
        "test.u8": 255,
        "test.i8": -128,
        "test.u16": 65535,
        "test.i16": -32768,
        "test.u32": 2**32 - 1,
        "test.i32": -(2**31),
        "test.u64": 2**64 - 1,
        "test.i64": -(2**63),
        "test.f32": 0.5,
        "test.f64": -1.25,
        "test.bool": True,
        "test.str": "héllo",
        "test.floats": [1.5, 2.5],
        "test.bools": [True, False],
        "test.nested": [[1, 2], [3]],
        "test.long_ints": ElidedArray("int32", 65),
    }


def test_tensor_table_reads_back_in_ggml_order_and_aligned(model: Path) -> None:
    info = read_gguf(model)
    assert info.version == 3
    assert info.file_size == model.stat().st_size
    assert info.data_offset % 32 == 0
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in info.tensors] == [
        ("token_embd.weight", (32, 8), "F32", 8 * 32 * 4),
        ("output_norm.weight", (32,), "F16", 32 * 2),
        ("blk.0.attn_q.weight", (64, 16), "Q8_0", 32 * 34),
        ("blk.0.attn_k.weight", (64, 4), "Q4_1", 8 * 20),
    ]
    assert [t.offset for t in info.tensors] == [0, 1024, 1024 + 64, 1024 + 64 + 1088]


def test_tensor_data_lies_where_the_table_says(model: Path) -> None:
    info = read_gguf(model)
    data = model.read_bytes()
    for t in info.tensors:
        assert data[info.data_offset + t.offset :][: t.nbytes] == TENSORS[t.name][0].tobytes()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A language model llama.cpp loads (`describe` checks the model, not just the file format)."""
    return write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny.gguf")


def test_describe_gives_manifest_entries_and_facts(tiny_llama: Path) -> None:
    inputs, outputs, facts = describe(tiny_llama)
    n_vocab = len(GGUFReader(tiny_llama).fields["tokenizer.ggml.tokens"].data)
    assert [(s.name, s.dtype, s.shape) for s in inputs] == [("tokens", "int32", (-1,))]
    assert [(s.name, s.dtype, s.shape) for s in outputs] == [("logits", "float32", (-1, n_vocab))]
    info = read_gguf(tiny_llama)
    assert facts == {
        "architecture": "llama",
        "model_name": "edgegen-tiny-llama",
        "context_length": 2048,
        "embedding_length": 64,
        "block_count": 2,
        "vocab_size": n_vocab,
        "tokenizer": "gpt2",
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "chat_template": CHATML_TEMPLATE,
        "file_type": 0,  # all F32
        "quantization": "F32",
        "parameter_count": sum(t.n_elements for t in info.tensors),
        "tensor_count": 2 + 9 * 2 + 1,  # embeddings, output norm and output; nine tensors per block
        "gguf_version": 3,
    }


def test_describe_leaves_out_a_missing_chat_template(tiny_llama: Path, tmp_path: Path) -> None:
    plain = edited_gguf(tiny_llama, tmp_path / "m.gguf", {"tokenizer.chat_template": None})
    assert "chat_template" not in describe(plain)[2]


def test_describe_refuses_a_gguf_without_a_token_list(tiny_llama: Path, tmp_path: Path) -> None:
    path = edited_gguf(tiny_llama, tmp_path / "m.gguf", {"tokenizer.ggml.tokens": None})
    with pytest.raises(IntegrityError, match=r"tokenizer\.ggml\.tokens"):
        describe(path)


def test_describe_refuses_a_model_llama_cpp_cannot_build(model: Path) -> None:
    """A well-formed file is not yet a loadable model: this one has blocks without their tensors."""
    with pytest.raises(IntegrityError, match=r"attention\.head_count"):
        describe(model)


def test_ggml_type_table_matches_the_gguf_package() -> None:
    for type_id, ggml_type in GGML_TYPES.items():
        theirs = GGMLQuantizationType(type_id)
        assert (ggml_type.name, ggml_type.block_size, ggml_type.type_size) == (
            theirs.name,
            *GGML_QUANT_SIZES[theirs],
        )


def test_every_ggml_type_the_gguf_package_knows_is_in_the_table() -> None:
    # A newer gguf package with new types fails here: add them to GGML_TYPES from ggml.c's type_traits.
    assert {t.value for t in GGML_QUANT_SIZES} <= set(GGML_TYPES)


def test_big_endian_file_from_the_writer_is_refused(tmp_path: Path) -> None:
    path = write_model(tmp_path / "be.gguf", endianess=GGUFEndian.BIG)
    with pytest.raises(IntegrityError, match="big-endian"):
        read_gguf(path)


def test_file_cut_anywhere_before_its_last_tensor_ends_is_refused(model: Path, tmp_path: Path) -> None:
    data = model.read_bytes()
    info = read_gguf(model)
    end = max(info.data_offset + t.offset + t.nbytes for t in info.tensors)
    cut_file = tmp_path / "cut.gguf"
    for cut in range(end):  # every cut: header, kv section, tensor table, padding and data
        cut_file.write_bytes(data[:cut])
        with pytest.raises(IntegrityError, match=RAN_OUT):
            read_gguf(cut_file)
    cut_file.write_bytes(data[:end])  # trailing padding is not needed
    assert len(read_gguf(cut_file).tensors) == 4


# -- crafted files -----------------------------------------------------------------------------------
def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def u32_kv(key: str, value: int) -> bytes:
    return kv(key, GGUFValueType.UINT32, struct.pack("<I", value))


def array_header(item_type: int, count: int) -> bytes:
    return struct.pack("<IQ", item_type, count)


def tensor_info(name: str | bytes, dims: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return (
        gguf_string(name)
        + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


def gguf_file(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(infos) if n_tensors is None else n_tensors,
        len(kvs) if n_kv is None else n_kv,
    )
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


LM_KVS = [
    kv("general.architecture", GGUFValueType.STRING, gguf_string("llama")),
    u32_kv("llama.context_length", 64),
    u32_kv("llama.embedding_length", 32),
    u32_kv("llama.block_count", 1),
    kv(
        "tokenizer.ggml.tokens",
        GGUFValueType.ARRAY,
        array_header(GGUFValueType.STRING, 2) + gguf_string("a") + gguf_string("b"),
    ),
]
F32, Q8_0 = GGMLQuantizationType.F32, GGMLQuantizationType.Q8_0


def nested(depth: int) -> bytes:
    """An array of arrays `depth` levels deep, holding one uint8."""
    payload = array_header(GGUFValueType.UINT8, 1) + b"\x07"
    for _ in range(depth - 1):
        payload = array_header(GGUFValueType.ARRAY, 1) + payload
    return payload


BAD_FILES: dict[str, tuple[bytes, str]] = {
    "wrong magic": (b"GGML" + gguf_file([], [])[4:], "not a GGUF file"),
    "version 1": (gguf_file([], [], version=1), "version 1 is not supported"),
    "version 99": (gguf_file([], [], version=99), "version 99 is not supported"),
    "byte-swapped header": (
        b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
        "big-endian",
    ),
    "too many tensors": (gguf_file([], [], n_tensors=65_537), "65537 tensors"),
    "more tensors than bytes": (
        gguf_file([], [], n_tensors=100),
        "100 tensors, more than the file could hold",
    ),
    "too many kv pairs": (gguf_file([], [], n_kv=2**40), "metadata entries, more than the file could hold"),
    "string longer than the file": (
        gguf_file([kv("k", GGUFValueType.STRING, struct.pack("<Q", 2**40) + b"abc")], []),
        "string length 1099511627776 runs past the end",
    ),
    "key longer than the file": (
        gguf_file([struct.pack("<Q", 2**63) + b"k" * 20], []),
        "metadata key #0: string length .* runs past the end",
    ),
    "huge array count": (
        gguf_file([kv("k", GGUFValueType.ARRAY, array_header(GGUFValueType.UINT64, 2**61))], []),
        "array of 2305843009213693952 uint64 items runs past the end",
    ),
    "huge string array count": (
        gguf_file([kv("k", GGUFValueType.ARRAY, array_header(GGUFValueType.STRING, 2**40))], []),
        "string items runs past the end",
    ),
    "a long string array's item longer than the file": (
        gguf_file(
            [
                kv(
                    "k",
                    GGUFValueType.ARRAY,
                    array_header(GGUFValueType.STRING, 100)
                    + gguf_string("ab") * 70
                    + struct.pack("<Q", 2**40)
                    + b"x" * 256,
                )
            ],
            [],
        ),
        r"'k'\[70\]: string length 1099511627776 runs past the end",
    ),
    "unknown value type": (gguf_file([kv("k", 13, b"\x00" * 8)], []), "unknown value type 13"),
    "unknown array item type": (
        gguf_file([kv("k", GGUFValueType.ARRAY, array_header(99, 1) + b"\x00")], []),
        "array of unknown value type 99",
    ),
    "bool neither 0 nor 1": (gguf_file([kv("k", GGUFValueType.BOOL, b"\x02")], []), "bool byte 2"),
    "bool array item neither 0 nor 1": (
        gguf_file([kv("k", GGUFValueType.ARRAY, array_header(GGUFValueType.BOOL, 2) + b"\x01\x05")], []),
        "bool byte is neither",
    ),
    "invalid UTF-8 key": (gguf_file([kv(b"general.\xff\xfe", 0, b"\x01")], []), "key #0 is not valid UTF-8"),
    "empty key": (gguf_file([kv(b"", 0, b"\x01")], []), "key #0 is empty"),
    "duplicate key": (gguf_file([u32_kv("k", 1), u32_kv("k", 2)], []), "'k' appears twice"),
    "nesting too deep": (
        gguf_file([kv("k", GGUFValueType.ARRAY, nested(MAX_NESTING + 1))], []),
        "nested more than",
    ),
    "alignment not a power of two": (
        gguf_file([u32_kv("general.alignment", 48)], []),
        "power of two, not 48",
    ),
    "alignment 0": (gguf_file([u32_kv("general.alignment", 0)], []), "power of two, not 0"),
    "alignment not a uint32": (
        gguf_file([kv("general.alignment", GGUFValueType.UINT64, struct.pack("<Q", 32))], []),
        "must be a uint32, not uint64",
    ),
    "unknown ggml type": (gguf_file([], [tensor_info("w", (32,), 4, 0)], bytes(128)), "unknown ggml type 4"),
    "n_dims 0": (gguf_file([], [tensor_info("w", (), F32, 0)], bytes(128)), "0 dimensions"),
    "n_dims 5": (gguf_file([], [tensor_info("w", (1,) * 5, F32, 0)], bytes(128)), "5 dimensions"),
    "dim of 0": (gguf_file([], [tensor_info("w", (4, 0), F32, 0)], bytes(128)), "dimension of 0"),
    "elements past int64": (
        gguf_file([], [tensor_info("w", (2**32, 2**32), F32, 0)], bytes(128)),
        "more than ggml can count",
    ),
    "row not whole blocks": (
        gguf_file([], [tensor_info("w", (16, 2), Q8_0, 0)], bytes(128)),
        "not a whole number of Q8_0 blocks",
    ),
    "empty tensor name": (gguf_file([], [tensor_info("", (4,), F32, 0)], bytes(32)), "empty name"),
    "tensor name too long": (
        gguf_file([], [tensor_info("w" * 64, (4,), F32, 0)], bytes(32)),
        "64 bytes is over the 63-byte limit",
    ),
    "data past the end of the file": (
        gguf_file([], [tensor_info("w", (64,), F32, 0)], bytes(255)),
        "'w': its 256 bytes at data offset 0 run past the end",
    ),
    "overlapping tensors": (
        gguf_file([], [tensor_info("a", (16,), F32, 0), tensor_info("b", (16,), F32, 32)], bytes(128)),
        "tensors 'a' and 'b' overlap",
    ),
    "misaligned offset": (
        gguf_file([], [tensor_info("w", (4,), F32, 16)], bytes(64)),
        "offset 16 is not a multiple of the alignment 32",
    ),
    "misaligned for a custom alignment": (
        gguf_file(
            [u32_kv("general.alignment", 64)],
            [tensor_info("w", (4,), F32, 32)],
            bytes(128),
            alignment=64,
        ),
        "offset 32 is not a multiple of the alignment 64",
    ),
    "duplicate tensor names": (
        gguf_file([], [tensor_info("w", (8,), F32, 0), tensor_info("w", (8,), F32, 32)], bytes(64)),
        "tensor 'w' appears twice",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_crafted_file_is_refused_with_a_message_naming_the_problem(tmp_path: Path, case: str) -> None:
    data, message = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(IntegrityError, match=message):
        read_gguf(path)


def test_crafted_builder_makes_a_valid_file(tmp_path: Path) -> None:
    # The refusals above differ from this file by the one field they name.
    path = tmp_path / "good.gguf"
    infos = [tensor_info("a", (8,), F32, 0), tensor_info("b", (32, 2), Q8_0, 32)]
    path.write_bytes(
        gguf_file([*LM_KVS, kv("k", GGUFValueType.ARRAY, nested(MAX_NESTING))], infos, bytes(128))
    )
    info = read_gguf(path)
    assert info.metadata["k"] == [[[[[[[[7]]]]]]]]
    assert [(t.name, t.nbytes) for t in info.tensors] == [("a", 32), ("b", 68)]


def test_empty_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(IntegrityError, match="truncated"):
        read_gguf(empty)


def test_what_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot read the GGUF file"):
        read_gguf(tmp_path)
    with pytest.raises(StoreError, match="not a regular file"):
        read_gguf(Path(os.devnull))


# -- never anything but IntegrityError ----------------------------------------------------------------
@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.gguf"


def parses_or_is_refused(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    with contextlib.suppress(IntegrityError):
        read_gguf(path)


@settings(max_examples=300)
@given(data=st.binary(max_size=512), valid_start=st.booleans())
def test_random_bytes_parse_or_are_refused(scratch: Path, data: bytes, valid_start: bool) -> None:
    parses_or_is_refused(scratch, (b"GGUF\x03\x00\x00\x00" if valid_start else b"") + data)


@settings(max_examples=500)
@given(draw=st.data())
def test_single_byte_mutations_parse_or_are_refused(scratch: Path, model: Path, draw: st.DataObject) -> None:
    data = bytearray(model.read_bytes())
    # Mutate the header, where all the parsing is; a changed data byte cannot change what is read.
    data[draw.draw(st.integers(0, read_gguf(model).data_offset - 1))] = draw.draw(st.integers(0, 255))
    parses_or_is_refused(scratch, bytes(data))
