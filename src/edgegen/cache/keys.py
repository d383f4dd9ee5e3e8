"""What a cached answer is filed under, and how answers are kept as bytes.

A key is a BLAKE2b-256 digest over length-prefixed fields: the tenant, the model, the identity of the
model version (its version name and the sha256 of every file, so a re-made version with the same name
never meets the old answers), the kind of answer, and the request in canonical form — tensors as
dtype, shape and raw bytes (so `1` and `1.0` in JSON are one key), generations as the prompt's text
segments (chat messages rendered by the model's template) each with whether its special tokens are
parsed, the sampling parameters, the token budget and the stop sequences. Two tenants never share a key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import orjson

from edgegen.errors import IntegrityError
from edgegen.store import Manifest


def _digest(fields: Iterable[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for field in fields:
        h.update(len(field).to_bytes(8, "little"))
        h.update(field)
    return h.digest()


def model_tag(manifest: Manifest) -> str:
    """The identity of one model version: changes whenever any of its files does."""
    files = "".join(f"{name}={digest};" for name, digest in sorted(manifest.files.items()))
    return _digest([manifest.version.encode(), files.encode()]).hex()[:32]


def tensors_key(tenant: str, model: str, tag: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    fields = [b"tensors", tenant.encode(), model.encode(), tag.encode()]
    for name in sorted(inputs):
        array = np.ascontiguousarray(inputs[name])
        fields += [name.encode(), array.dtype.str.encode(), repr(array.shape).encode(), array.tobytes()]
    return _digest(fields)


def generation_key(
    tenant: str,
    model: str,
    tag: str,
    prompt: Sequence[tuple[str, bool]],
    params: Mapping[str, object],
    max_tokens: int | None,
    n_ctx: int,
    stops: Sequence[str],
) -> bytes:
    """`prompt` as (text, special) segments (`engine.prompt.Prompt`: whether special tokens in each are
    parsed), which fix its tokens for a given model version; `params` the sampling parameters by name;
    `max_tokens` None means the room left in a sequence of `n_ctx` tokens."""
    request = {
        "prompt": [[text, special] for text, special in prompt],
        "sampling": dict(params),
        "max_tokens": max_tokens,
        "n_ctx": n_ctx,
        "stop": list(stops),
    }
    return _digest([b"generation", tenant.encode(), model.encode(), tag.encode(), orjson.dumps(request)])


def encode_tensors(outputs: Mapping[str, np.ndarray]) -> bytes:
    """A JSON header (name, dtype, shape per tensor) with its length, then each tensor's bytes."""
    arrays = {name: np.ascontiguousarray(array) for name, array in outputs.items()}
    header = orjson.dumps([[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()])
    return len(header).to_bytes(4, "little") + header + b"".join(a.tobytes() for a in arrays.values())


def decode_tensors(blob: bytes) -> dict[str, np.ndarray]:
    try:
        length = int.from_bytes(blob[:4], "little")
        offset = 4 + length
        outputs: dict[str, np.ndarray] = {}
        for name, dtype_str, shape in orjson.loads(blob[4:offset]):
            dtype = np.dtype(dtype_str)
            size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            outputs[name] = np.frombuffer(
                blob, dtype=dtype, count=size // dtype.itemsize, offset=offset
            ).reshape(shape)
            offset += size
    except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
        raise IntegrityError(f"a cached answer is damaged: {exc}") from None
    if offset != len(blob):
        raise IntegrityError("a cached answer is damaged: its length does not match its header")
    return outputs
