"""What a GGUF language model must hold for llama.cpp to load it, checked before llama.cpp sees it.

`read_gguf` proves a file is well-formed; this proves the model in it is one llama.cpp can build. Its
loader trusts the hyperparameters: some it checks with `GGML_ASSERT` (which aborts the whole process,
not just the load), some it divides by, and some size the arrays it indexes — a head count of 0, an
expert count over `LLAMA_MAX_EXPERTS`, a rope scaling type it does not know, a token-type array shorter
than the vocabulary. So every hyperparameter llama.cpp reads for the architectures we serve is checked
here against the others and against the tensors the file really holds:

    n_layer  = <arch>.block_count          1..512 (LLAMA_MAX_LAYERS), = the blocks blk.0 … blk.{n-1}
    n_embd   = <arch>.embedding_length     > 0, bounded
    n_head   = <arch>.attention.head_count          > 0, bounded; one value, not one per layer
    n_head_kv= <arch>.attention.head_count_kv       > 0 and divides n_head (default n_head)
    head_dim = <arch>.attention.key_length          default n_embd / n_head, which must divide
    n_ff     = <arch>.feed_forward_length  > 0, bounded
    n_ctx    = <arch>.context_length       > 0, bounded
    n_rot    = <arch>.rope.dimension_count even, <= head_dim (= head_dim for llama, as llama.cpp wants)
    n_vocab  = len(tokenizer.ggml.tokens)  = token types, scores, <arch>.vocab_size; ids below it
    tensors  token_embd (n_embd, n_vocab), output_norm (n_embd), output (n_embd, n_vocab) if present,
             and each block's own, shaped from the numbers above (ggml order: row length first)

Mixture-of-experts files are refused: llama.cpp asserts on their expert counts, and none is served here.

    >>> shape = check_language_model(read_gguf(Path("model.gguf")))   # doctest: +SKIP
    >>> shape.n_layer, shape.n_vocab                                   # doctest: +SKIP
    (30, 49152)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgegen.errors import IntegrityError
from edgegen.store.gguf import ElidedArray, GGUFInfo, MetadataValue, TensorInfo

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: the size of llama.cpp's per-layer arrays
MAX_EMBD = 1 << 16  # the widest models have 16-25k; this bounds what the loader allocates from it
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_FF = 1 << 20
MAX_CONTEXT = 1 << 24
MAX_VOCAB = 1 << 22
# llama.cpp's LLAMA_ROPE_SCALING_TYPES; any other name fails GGML_ASSERT(... != UNSPECIFIED).
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Keys llama.cpp reads with GGML_ASSERTs on their values (n_expert <= LLAMA_MAX_EXPERTS, …): 0 or absent.
EXPERT_KEYS = ("expert_count", "expert_used_count", "expert_group_count", "expert_group_used_count")
# The token ids llama.cpp looks up in the vocabulary (tokenizer.ggml.<name>_token_id).
SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask")
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class LlmShape:
    """The hyperparameters llama.cpp will build the model from, as checked."""

    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_ff: int
    n_ctx_train: int
    n_vocab: int

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token position takes in llama.cpp (keys and values, f16, every layer)."""
        return 2 * self.n_layer * self.n_head_kv * (self.head_dim_k + self.head_dim_v)


# architecture -> {tensor suffix in every block: shape in ggml order, from the hyperparameters}
Shapes = dict[str, tuple[str, ...]]
_LLAMA: Shapes = {
    "attn_norm.weight": ("n_embd",),
    "attn_q.weight": ("n_embd", "q"),
    "attn_k.weight": ("n_embd", "k"),
    "attn_v.weight": ("n_embd", "v"),
    "attn_output.weight": ("o", "n_embd"),
    "ffn_norm.weight": ("n_embd",),
    "ffn_gate.weight": ("n_embd", "n_ff"),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_down.weight": ("n_ff", "n_embd"),
}
BLOCK_TENSORS: dict[str, Shapes] = {
    "llama": _LLAMA,
    "qwen2": {**_LLAMA, "attn_q.bias": ("q",), "attn_k.bias": ("k",), "attn_v.bias": ("v",)},
    "qwen3": {**_LLAMA, "attn_q_norm.weight": ("head_dim_k",), "attn_k_norm.weight": ("head_dim_k",)},
}


def check_language_model(info: GGUFInfo) -> LlmShape:
    """The model's hyperparameters, or IntegrityError naming the first one llama.cpp could not load."""
    meta = info.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise IntegrityError("GGUF metadata has no general.architecture")
    if arch not in BLOCK_TENSORS:
        raise IntegrityError(
            f"GGUF architecture {arch[:64]!r} is not served here: use one of {', '.join(BLOCK_TENSORS)}"
        )
    for key in EXPERT_KEYS:
        if meta.get(f"{arch}.{key}", 0) != 0:
            raise IntegrityError(f"{arch}.{key} is set: mixture-of-experts models are not served here")
    n_layer = _count(meta, f"{arch}.block_count", MAX_LAYERS)
    n_embd = _count(meta, f"{arch}.embedding_length", MAX_EMBD)
    n_head = _count(meta, f"{arch}.attention.head_count", MAX_HEADS)
    n_head_kv = _count(meta, f"{arch}.attention.head_count_kv", MAX_HEADS, default=n_head)
    if n_head % n_head_kv:
        raise IntegrityError(
            f"{arch}.attention.head_count_kv ({n_head_kv}) does not divide the head count ({n_head})"
        )
    if n_embd % n_head and f"{arch}.attention.key_length" not in meta:
        raise IntegrityError(f"{arch}.embedding_length ({n_embd}) is not a whole number of {n_head} heads")
    head_dim_k = _count(meta, f"{arch}.attention.key_length", MAX_HEAD_DIM, default=n_embd // n_head)
    head_dim_v = _count(meta, f"{arch}.attention.value_length", MAX_HEAD_DIM, default=n_embd // n_head)
    n_rot = _count(meta, f"{arch}.rope.dimension_count", MAX_HEAD_DIM, default=head_dim_k)
    # ggml_rope rotates pairs of the first n_rot dimensions of a head, asserting both.
    if n_rot > head_dim_k or n_rot % 2 or (arch == "llama" and n_rot != head_dim_k):
        raise IntegrityError(
            f"{arch}.rope.dimension_count ({n_rot}) does not fit heads of {head_dim_k} dimensions"
        )
    scaling = meta.get(f"{arch}.rope.scaling.type", "linear")
    if scaling not in ROPE_SCALING_TYPES:
        raise IntegrityError(f"{arch}.rope.scaling.type {str(scaling)[:64]!r} is not one llama.cpp knows")
    shape = LlmShape(
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        n_ff=_count(meta, f"{arch}.feed_forward_length", MAX_FF),
        n_ctx_train=_count(meta, f"{arch}.context_length", MAX_CONTEXT),
        n_vocab=_vocabulary(info, arch),
    )
    _check_tensors(info.tensors, shape)
    return shape


def _count(meta: dict[str, MetadataValue], key: str, limit: int, default: int | None = None) -> int:
    """A positive integer hyperparameter no larger than `limit`; `default` when the key is absent."""
    value = meta.get(key)
    if value is None:
        if default is None:
            raise IntegrityError(f"GGUF metadata has no {key}")
        return default
    if isinstance(value, list | ElidedArray):
        raise IntegrityError(f"{key} is an array: per-layer values are not served here")
    if not isinstance(value, int) or isinstance(value, bool):
        raise IntegrityError(f"{key} should be an integer, not {type(value).__name__}")
    if not 1 <= value <= limit:
        raise IntegrityError(f"{key} is {value}: it must be between 1 and {limit}")
    return value


def _vocabulary(info: GGUFInfo, arch: str) -> int:
    """The vocabulary size, with every per-token array and token id checked against it."""
    meta = info.metadata
    n_vocab = _array_length(info, "tokenizer.ggml.tokens", "string")
    if n_vocab is None:
        raise IntegrityError("GGUF file has no token list (tokenizer.ggml.tokens): not a language model")
    if not 1 <= n_vocab <= MAX_VOCAB:
        raise IntegrityError(f"the token list has {n_vocab} tokens: it must hold 1 to {MAX_VOCAB}")
    declared = meta.get(f"{arch}.vocab_size", n_vocab)
    if declared != n_vocab:
        raise IntegrityError(f"{arch}.vocab_size is {declared} but the token list holds {n_vocab} tokens")
    # llama.cpp reads these as raw C arrays of n_vocab items: a shorter or narrower one is read past its end.
    for key, item_type in (("tokenizer.ggml.token_type", "int32"), ("tokenizer.ggml.scores", "float32")):
        if key in meta and _array_length(info, key, item_type) != n_vocab:
            raise IntegrityError(f"{key} must be an array of {n_vocab} {item_type} values, one per token")
    if "tokenizer.ggml.merges" in meta and _array_length(info, "tokenizer.ggml.merges", "string") is None:
        raise IntegrityError("tokenizer.ggml.merges must be an array of strings")
    for name in SPECIAL_TOKENS:
        key = f"tokenizer.ggml.{name}_token_id"
        token = meta.get(key)
        if token is not None and (not isinstance(token, int) or not 0 <= token < n_vocab):
            raise IntegrityError(f"{key} is {token!r}: not a token of the {n_vocab}-token vocabulary")
    return n_vocab


def _array_length(info: GGUFInfo, key: str, item_type: str) -> int | None:
    """The length of the array `key` if its items are `item_type` (a `read_gguf` type name), else None."""
    if info.array_types.get(key) != item_type:
        return None
    value = info.metadata[key]
    if isinstance(value, ElidedArray):
        return value.length
    return len(value) if isinstance(value, list) else None


def _check_tensors(tensors: tuple[TensorInfo, ...], shape: LlmShape) -> None:
    dims = {
        "n_embd": shape.n_embd,
        "n_ff": shape.n_ff,
        "head_dim_k": shape.head_dim_k,
        "q": shape.head_dim_k * shape.n_head,
        "k": shape.head_dim_k * shape.n_head_kv,
        "v": shape.head_dim_v * shape.n_head_kv,
        "o": shape.head_dim_v * shape.n_head,
    }
    by_name = {t.name: t for t in tensors}
    blocks = {int(m.group(1)) for t in tensors if (m := _BLOCK.fullmatch(t.name))}
    if blocks != set(range(shape.n_layer)):
        held = f"blocks 0 to {max(blocks)}" if blocks else "no blocks"
        raise IntegrityError(
            f"{shape.architecture}.block_count is {shape.n_layer} but the file holds {held} "
            f"({len(blocks)} distinct)"
        )
    vocab = (shape.n_embd, shape.n_vocab)
    _expect(by_name, "token_embd.weight", vocab)
    _expect(by_name, "output_norm.weight", (shape.n_embd,))
    if "output.weight" in by_name:  # absent: the output layer shares the token embeddings
        _expect(by_name, "output.weight", vocab)
    for block in range(shape.n_layer):
        for suffix, names in BLOCK_TENSORS[shape.architecture].items():
            _expect(by_name, f"blk.{block}.{suffix}", tuple(dims[n] for n in names))


def _expect(by_name: dict[str, TensorInfo], name: str, want: tuple[int, ...]) -> None:
    tensor = by_name.get(name)
    if tensor is None:
        raise IntegrityError(f"the model has no tensor {name!r}, which llama.cpp needs")
    if tensor.shape != want:
        raise IntegrityError(
            f"tensor {name!r} has shape {list(tensor.shape)}, but the metadata makes it {list(want)}"
        )
