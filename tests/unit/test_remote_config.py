"""Remote configuration changes on their own: validated whole before anything changes, persisted, read
back at start, live where the setting is read anew."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edgegen.config import load_settings, read_remote
from edgegen.errors import Forbidden, InvalidInput
from edgegen.node.remote_config import apply_live, change, watch


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEGEN_HOME", str(tmp_path))
    return tmp_path


def test_changes_persist_apply_live_and_load_at_start(home: Path) -> None:
    settings = load_settings()
    result = change(settings, {"cache.ttl_s": 30, "batching.max_batch_size": 4, "log_level": "warning"})
    assert result["applied"] == ["cache.ttl_s", "log_level"]
    assert result["on_restart"] == ["batching.max_batch_size"]
    assert settings.cache.ttl_s == 30.0
    assert settings.batching.max_batch_size == 32
    assert read_remote(home) == {
        "cache": {"ttl_s": 30.0},
        "batching": {"max_batch_size": 4},
        "log_level": "warning",
    }
    again = load_settings()
    assert (again.cache.ttl_s, again.batching.max_batch_size, again.log_level) == (30.0, 4, "warning")
    change(again, {"models.digits.max_batch_size": 2})  # a per-model override
    assert load_settings().batching_for("digits").max_batch_size == 2


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"cache.ttl_s": 0}, InvalidInput),
        ({"cache.ttl_s": "soon"}, InvalidInput),
        ({"cache.enabled": "perhaps"}, InvalidInput),
        ({"cache": {"ttl_s": 1}}, InvalidInput),
        ({"cache.nope": 1}, InvalidInput),
        ({"../etc.passwd": 1}, InvalidInput),
        ({"__class__.x": 1}, InvalidInput),
        ({"security.auth": False}, Forbidden),
        ({"tls.cert_file": "/tmp/x"}, Forbidden),
        ({"home": "/"}, Forbidden),
        ({"logs.ship_to": "http://elsewhere"}, Forbidden),
        ({f"models.m{i}.max_batch_size": 1 for i in range(65)}, InvalidInput),
        ({"models.../x.max_batch_size": 1}, InvalidInput),
        ({"models.digits.cache": "sometimes"}, InvalidInput),
    ],
)
def test_refused_changes_change_nothing(home: Path, changes: dict[str, Any], error: type[Exception]) -> None:
    settings = load_settings()
    change(settings, {"cache.ttl_s": 5})
    with pytest.raises(error):
        change(settings, {"request_timeout_s": 9, **changes})
    assert read_remote(home) == {"cache": {"ttl_s": 5.0}}
    assert settings.request_timeout_s == 30.0


def test_nothing_to_change(home: Path) -> None:
    with pytest.raises(InvalidInput):
        change(load_settings(), {})


def test_what_the_environment_sets_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEGEN_CACHE__TTL_S", "10")
    with pytest.raises(Forbidden, match="EDGEGEN_CACHE__TTL_S"):
        change(load_settings(), {"cache.ttl_s": 20})


def test_odd_strings_survive_the_file(home: Path) -> None:
    value = 'quote " backslash \\ newline-free ünïcode'
    change(load_settings(), {"default_model": value})
    assert load_settings().default_model == value


def test_another_worker_takes_the_live_settings(home: Path) -> None:
    mine, theirs = load_settings(), load_settings()  # two processes of one node
    change(mine, {"cache.ttl_s": 7, "batching.max_batch_size": 3})
    assert theirs.cache.ttl_s == 3600.0
    assert apply_live(theirs) == ["cache.ttl_s"]
    assert (theirs.cache.ttl_s, theirs.batching.max_batch_size) == (7.0, 32)
    assert apply_live(theirs) == []  # nothing new


def test_the_watch_applies_what_another_worker_wrote(home: Path) -> None:
    async def run() -> float:
        settings, other = load_settings(), load_settings()
        task = asyncio.create_task(watch(settings, 0.01))
        await asyncio.sleep(0.05)
        change(other, {"llm.timeout_s": 12})
        for _ in range(300):
            if settings.llm.timeout_s == 12:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return settings.llm.timeout_s

    assert asyncio.run(run()) == 12.0
