"""A GGUF model llama.cpp would assert on is refused by our reader, with a message naming the value.

Each case is the tiny llama (tests/llm_models.py) with one metadata value changed or one tensor left
out; the first four abort llama.cpp 0.3.36's loader outright (GGML_ASSERT, SIGABRT) when it is handed
the file, which is what our reader must never let happen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFValueType

from edgegen.errors import IntegrityError
from edgegen.store.gguf import read_gguf
from edgegen.store.gguf_hparams import check_language_model
from tests.gguf_edits import Value, edited_gguf
from tests.llm_models import write_tiny_llama

ARRAY, STRING, INT32, UINT8 = (
    GGUFValueType.ARRAY,
    GGUFValueType.STRING,
    GGUFValueType.INT32,
    GGUFValueType.UINT8,
)
N_VOCAB = 758  # the tiny llama's tokens: 3 special, 256 bytes, one per merge that spells a new token

BAD: dict[str, tuple[dict[str, Value | None], str]] = {
    # llama.cpp: GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS)
    "a million blocks": (
        {"llama.block_count": 1_000_000},
        r"block_count is 1000000: it must be between 1 and 512",
    ),
    # GGML_ASSERT(hparams.rope_scaling_type_train != LLAMA_ROPE_SCALING_TYPE_UNSPECIFIED)
    "unknown rope scaling": ({"llama.rope.scaling.type": "bogus"}, "rope.scaling.type 'bogus' is not one"),
    # GGML_ASSERT(hparams.n_expert <= LLAMA_MAX_EXPERTS), and the assertions on the counts beside it
    "experts": ({"llama.expert_count": 100_000}, "mixture-of-experts"),
    "experts used without experts": ({"llama.expert_used_count": 2}, "expert_used_count is set"),
    # the rest fail llama.cpp's load or context in other ways, or divide by zero
    "more blocks than tensors": (
        {"llama.block_count": 3},
        "block_count is 3 but the file holds blocks 0 to 1",
    ),
    "kv heads not dividing the heads": (
        {"llama.attention.head_count_kv": 3},
        r"head_count_kv \(3\) does not divide",
    ),
    "no kv heads": ({"llama.attention.head_count_kv": 0}, "head_count_kv is 0"),
    "no heads": ({"llama.attention.head_count": 0}, "head_count is 0"),
    "vocab size against the token list": (
        {"llama.vocab_size": 10_000},
        "vocab_size is 10000 but the token list",
    ),
    "embedding width against the tensors": (
        {"llama.embedding_length": 128, "llama.rope.dimension_count": 32},
        rf"'token_embd.weight' has shape \[64, {N_VOCAB}\], but the metadata makes it \[128, {N_VOCAB}\]",
    ),
    "rope wider than a head": ({"llama.rope.dimension_count": 7}, r"dimension_count \(7\) does not fit"),
    "no context": ({"llama.context_length": 0}, "context_length is 0"),
    "no feed-forward": ({"llama.feed_forward_length": None}, "has no llama.feed_forward_length"),
    "per-layer heads": ({"llama.attention.head_count": ([4, 4], ARRAY, INT32)}, "per-layer values"),
    "a count as a string": ({"llama.block_count": "2"}, "should be an integer, not str"),
    "unserved architecture": ({"general.architecture": "gpt2"}, "architecture 'gpt2' is not served"),
    "token types of bytes": (
        {"tokenizer.ggml.token_type": ([1] * N_VOCAB, ARRAY, UINT8)},
        f"token_type must be an array of {N_VOCAB} int32",
    ),
    "too few scores": (
        {"tokenizer.ggml.scores": ([0.0] * 10, ARRAY, GGUFValueType.FLOAT32)},
        "scores must be",
    ),
    "merges as numbers": (
        {"tokenizer.ggml.merges": ([1, 2], ARRAY, INT32)},
        "merges must be an array of strings",
    ),
    "tokens as numbers": ({"tokenizer.ggml.tokens": ([1, 2], ARRAY, INT32)}, "no token list"),
    "bos past the vocabulary": ({"tokenizer.ggml.bos_token_id": N_VOCAB}, "bos_token_id is 758: not a token"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("hparams") / "tiny.gguf")


def test_the_tiny_llama_is_a_model_llama_cpp_builds(tiny: Path) -> None:
    shape = check_language_model(read_gguf(tiny))
    assert (shape.architecture, shape.n_layer, shape.n_embd, shape.n_vocab) == ("llama", 2, 64, N_VOCAB)
    assert (shape.n_head, shape.n_head_kv, shape.head_dim_k, shape.n_ff, shape.n_ctx_train) == (
        4,
        2,
        16,
        128,
        2048,
    )
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * (16 + 16)  # f16 keys and values, 2 kv heads, 2 layers


@pytest.mark.parametrize("case", BAD)
def test_a_value_llama_cpp_cannot_take_is_refused(tiny: Path, tmp_path: Path, case: str) -> None:
    changes, message = BAD[case]
    bad = edited_gguf(tiny, tmp_path / "bad.gguf", changes)
    with pytest.raises(IntegrityError, match=message):
        check_language_model(read_gguf(bad))


def test_a_block_missing_a_tensor_is_refused(tiny: Path, tmp_path: Path) -> None:
    bad = edited_gguf(tiny, tmp_path / "bad.gguf", {}, drop_tensors={"blk.1.ffn_up.weight"})
    with pytest.raises(IntegrityError, match=r"no tensor 'blk\.1\.ffn_up\.weight'"):
        check_language_model(read_gguf(bad))


def test_a_block_past_the_count_is_refused(tiny: Path, tmp_path: Path) -> None:
    bad = edited_gguf(tiny, tmp_path / "bad.gguf", {"llama.block_count": 1})
    with pytest.raises(
        IntegrityError, match=r"block_count is 1 but the file holds blocks 0 to 1 \(2 distinct\)"
    ):
        check_language_model(read_gguf(bad))


def test_array_item_types_are_kept_for_short_arrays(tiny: Path, tmp_path: Path) -> None:
    path = edited_gguf(tiny, tmp_path / "m.gguf", {"x.bytes": (list(np.arange(3)), ARRAY, UINT8)})
    info = read_gguf(path)
    assert info.metadata["x.bytes"] == [0, 1, 2]
    assert info.array_types["x.bytes"] == "uint8"
    assert info.array_types["tokenizer.ggml.tokens"] == "string"
    assert info.array_types["tokenizer.ggml.token_type"] == "int32"
