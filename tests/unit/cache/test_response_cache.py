"""The response cache as routes use it: keys, Cache-Control, tiers together, invalidation, metrics."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgegen.cache import Directives, ResponseCache, directives
from edgegen.cache.keys import decode_tensors, encode_tensors, generation_key, model_tag, tensors_key
from edgegen.cache.memory import Removed
from edgegen.config import CacheSettings, ModelOverrides, Settings
from edgegen.engine.sampling import SamplingParams
from edgegen.errors import IntegrityError
from edgegen.security.atrest import Keyring, new_key
from edgegen.store import Manifest, TensorSpec
from tests.unit.cache.test_tiers import Clock


def manifest(version: str = "1", digest: str = "a" * 64, name: str = "m") -> Manifest:
    spec = TensorSpec(name="x", dtype="float32", shape=(-1, 4))
    return Manifest(
        name=name, version=version, format="onnx", inputs=[spec], outputs=[spec], files={"model.onnx": digest}
    )


def scope(cache_control: str | None = None) -> dict[str, Any]:
    headers = [(b"cache-control", cache_control.encode())] if cache_control is not None else []
    return {"headers": headers}


def ask(tenant: str = "acme", cache_control: str | None = None) -> tuple[str, Directives]:
    """A tenant's request: its owner, and what its Cache-Control allows."""
    return tenant, directives(scope(cache_control))


class Observer:
    def __init__(self) -> None:
        self.lookups: list[tuple[str, str, str | None]] = []
        self.removed: dict[str, Removed] = {}
        self.sizes: dict[str, tuple[int, int]] = {}

    def on_lookup(self, model: str, result: str, tier: str | None) -> None:
        self.lookups.append((model, result, tier))

    def on_removed(self, tier: str, removed: Removed) -> None:
        total = self.removed.setdefault(tier, Removed())
        total.size += removed.size
        total.expired += removed.expired
        total.invalidated += removed.invalidated

    def on_size(self, tier: str, size: int, entries: int) -> None:
        self.sizes[tier] = (size, entries)


def make(tmp_path: Path, clock: Clock, observer: Observer | None = None, **cache: Any) -> ResponseCache:
    settings = Settings(home=tmp_path, cache=CacheSettings(**cache))
    return ResponseCache(settings, observer=observer, clock=clock)


def feeds(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array([values], dtype=np.float32)}


def key_for(inputs: dict[str, np.ndarray]) -> Any:
    return lambda owner, model, tag: tensors_key(owner, model, tag, inputs)


def test_keys_are_canonical_and_separate_tenants_models_and_versions() -> None:
    tag = model_tag(manifest())
    same = tensors_key("acme", "m", tag, {"x": np.array([[1, 2]], dtype=np.float32)})
    assert same == tensors_key("acme", "m", tag, {"x": np.asarray([[1.0, 2.0]]).astype(np.float32)})
    assert same != tensors_key("globex", "m", tag, {"x": np.array([[1, 2]], dtype=np.float32)})
    assert same != tensors_key("acme", "n", tag, {"x": np.array([[1, 2]], dtype=np.float32)})
    assert same != tensors_key("acme", "m", tag, {"x": np.array([[1, 2]], dtype=np.float64)})
    assert same != tensors_key("acme", "m", tag, {"x": np.array([[1], [2]], dtype=np.float32)})
    assert model_tag(manifest()) != model_tag(manifest(version="2"))
    assert model_tag(manifest()) != model_tag(manifest(digest="b" * 64))  # same name, other bytes
    greedy = SamplingParams(temperature=0)

    def gen(prompt: str = "hi", special: bool = True, params: SamplingParams = greedy, **kw: Any) -> bytes:
        fields = {"max_tokens": 16, "n_ctx": 2048, "stops": [], **kw}
        return generation_key("acme", "m", tag, ((prompt, special),), asdict(params), **fields)

    assert gen() == gen(params=SamplingParams(temperature=0))
    others = [gen("hi "), gen(special=False), gen(max_tokens=17), gen(max_tokens=None), gen(n_ctx=4096),
              gen(stops=["\n"]), gen(params=SamplingParams(temperature=0, top_k=5))]  # fmt: skip
    assert len({gen(), *others}) == 1 + len(others)


def test_tensors_round_trip_and_damage_is_reported() -> None:
    outputs = {
        "logits": np.arange(12, dtype=np.float32).reshape(3, 4),
        "label": np.array([1, 2, 3], np.int64),
    }
    back = decode_tensors(encode_tensors(outputs))
    assert list(back) == ["logits", "label"]
    for name, array in outputs.items():
        assert back[name].dtype == array.dtype
        np.testing.assert_array_equal(back[name], array)
    with pytest.raises(IntegrityError):
        decode_tensors(encode_tensors(outputs)[:-3])
    with pytest.raises(IntegrityError):
        decode_tensors(b"\xff\xff\x00\x00not json")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (True, True, None)),
        ("no-cache", (False, True, None)),
        ("No-Store", (True, False, None)),
        ("no-cache, no-store", (False, False, None)),
        ("max-age=30", (True, True, 30.0)),
        ("max-age=-1, max-age=x, junk=\x7f", (True, True, None)),
    ],
)
def test_cache_control_directives(header: str | None, expected: tuple[bool, bool, float | None]) -> None:
    assert directives(scope(cache_control=header)) == expected


def test_miss_then_hit_from_memory_then_from_disk_after_a_restart(tmp_path: Path) -> None:
    clock, observer = Clock(), Observer()
    cache = make(tmp_path, clock, observer)
    ticket = cache.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert ticket is not None
    assert cache.lookup(ticket) is None
    assert ticket.headers == {"X-Edgegen-Cache": "miss"}
    cache.store(ticket, b"answer")
    clock.now += 5
    again = cache.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert again is not None
    assert cache.lookup(again) == b"answer"
    assert again.headers == {"X-Edgegen-Cache": "hit", "Age": "5"}
    cache.close()  # waits for the disk write
    restarted = make(tmp_path, clock, observer)
    third = restarted.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert third is not None
    assert restarted.lookup(third) == b"answer"
    fourth = restarted.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert fourth is not None
    assert restarted.lookup(fourth) == b"answer"  # promoted into memory by the disk hit
    restarted.close()
    assert observer.lookups == [
        ("m", "miss", None),
        ("m", "hit", "memory"),
        ("m", "hit", "disk"),
        ("m", "hit", "memory"),
    ]


def test_tenants_do_not_share_answers(tmp_path: Path) -> None:
    cache = make(tmp_path, Clock(), disk_bytes=0)
    mine = cache.ticket(*ask("acme"), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert mine is not None
    cache.lookup(mine)
    cache.store(mine, b"acme's")
    theirs = cache.ticket(*ask("globex"), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert theirs is not None
    assert cache.lookup(theirs) is None


def test_directives_and_nondeterministic_requests(tmp_path: Path) -> None:
    clock, observer = Clock(), Observer()
    cache = make(tmp_path, clock, observer, disk_bytes=0)
    k = key_for(feeds(0, 0, 0, 0))
    sampled = cache.ticket(*ask(), manifest(), k, deterministic=False)
    assert sampled is not None
    assert cache.lookup(sampled) is None
    cache.store(sampled, b"sampled")
    assert sampled.headers == {"X-Edgegen-Cache": "bypass"}
    unstored = cache.ticket(*ask(cache_control="no-store"), manifest(), k, deterministic=True)
    assert unstored is not None
    assert cache.lookup(unstored) is None
    cache.store(unstored, b"not kept")
    fresh = cache.ticket(*ask(cache_control="no-cache"), manifest(), k, deterministic=True)
    assert fresh is not None
    assert cache.lookup(fresh) is None
    assert fresh.headers == {"X-Edgegen-Cache": "bypass"}
    cache.store(fresh, b"kept")  # no-cache computes afresh, and the fresh answer is kept
    clock.now += 100
    young = cache.ticket(*ask(cache_control="max-age=60"), manifest(), k, deterministic=True)
    assert young is not None
    assert cache.lookup(young) is None
    plain = cache.ticket(*ask(), manifest(), k, deterministic=True)
    assert plain is not None
    assert cache.lookup(plain) == b"kept"
    assert [r for _, r, _ in observer.lookups] == ["bypass", "miss", "bypass", "miss", "hit"]


def test_ttl_and_size_limits(tmp_path: Path) -> None:
    clock = Clock()
    cache = make(tmp_path, clock, disk_bytes=0, ttl_s=10, max_entry_bytes=100)
    big = cache.ticket(*ask(), manifest(), key_for(feeds(9, 9, 9, 9)), deterministic=True)
    small = cache.ticket(*ask(), manifest(), key_for(feeds(1, 1, 1, 1)), deterministic=True)
    assert big is not None
    assert small is not None
    cache.store(big, bytes(101))
    cache.store(small, bytes(100))
    assert cache.lookup(big) is None
    assert cache.lookup(small) == bytes(100)
    clock.now += 11
    assert cache.lookup(small) is None


def test_activation_drops_the_other_versions_answers_in_both_tiers(tmp_path: Path) -> None:
    clock, observer = Clock(), Observer()
    cache = make(tmp_path, clock, observer)
    for version in ("1", "2"):
        ticket = cache.ticket(*ask(), manifest(version), key_for(feeds(1, 2, 3, 4)), deterministic=True)
        assert ticket is not None
        cache.store(ticket, f"v{version}".encode())
    other = cache.ticket(*ask(), manifest(name="n"), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert other is not None
    cache.store(other, b"n")
    cache.invalidate("m", manifest("2"))
    cache.close()
    assert observer.removed["memory"].invalidated == 1
    assert observer.removed["disk"].invalidated == 1
    assert observer.sizes["disk"][1] == 2
    reopened = make(tmp_path, clock, disk_bytes=2**20, memory_bytes=0)
    v1 = reopened.ticket(*ask(), manifest("1"), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    v2 = reopened.ticket(*ask(), manifest("2"), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert v1 is not None
    assert v2 is not None
    assert reopened.lookup(v1) is None
    assert reopened.lookup(v2) == b"v2"
    reopened.close()


def test_a_model_can_be_left_out_and_the_cache_switched_off(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, models={"m": ModelOverrides(cache=False)})
    cache = ResponseCache(settings)
    assert cache.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True) is None
    assert (
        cache.ticket(*ask(), manifest(name="n"), key_for(feeds(1, 2, 3, 4)), deterministic=True) is not None
    )
    cache.close()
    off = ResponseCache(Settings(home=tmp_path, cache=CacheSettings(enabled=False)))
    assert off.ticket(*ask(), manifest(name="n"), key_for(feeds(1, 2, 3, 4)), deterministic=True) is None


def test_encrypted_disk_tier_through_the_cache(tmp_path: Path) -> None:
    keyring = Keyring.parse(f"k1:{new_key()}")
    settings = Settings(home=tmp_path, cache=CacheSettings(memory_bytes=0))
    cache = ResponseCache(settings, keyring)
    ticket = cache.ticket(*ask(), manifest(), key_for(feeds(1, 2, 3, 4)), deterministic=True)
    assert ticket is not None
    cache.store(ticket, b"a secret answer")
    cache.close()
    on_disk = b"".join(f.read_bytes() for f in (tmp_path / "cache").iterdir())
    assert b"a secret answer" not in on_disk
    reopened = ResponseCache(settings, keyring)
    assert reopened.lookup(ticket) == b"a secret answer"
    reopened.close()
