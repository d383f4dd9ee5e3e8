"""Remote configuration changes on their own: validated whole before anything changes, persisted, read
back at start, live where the setting is read anew; paths, hosts and secrets refused by their type, every
number bounded; a bad remote file passed over at start for the last good one."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from edgegen.config import LOCAL_ONLY, ModelOverrides, Settings, load_settings, remote_path
from edgegen.errors import Forbidden, InvalidInput, Unprocessable
from edgegen.node import remote_config
from edgegen.node.remote_config import apply_live, change, effective, watch


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEGEN_HOME", str(tmp_path))
    monkeypatch.delenv("EDGEGEN_CONFIG", raising=False)
    return tmp_path


def stored(home: Path) -> dict[str, Any]:
    """What the remote file holds, read as start-up reads it."""
    return tomllib.loads(remote_path(home).read_text())


def test_changes_persist_apply_live_and_load_at_start(home: Path) -> None:
    settings = load_settings()
    result = change(settings, {"cache.ttl_s": 30, "batching.max_batch_size": 4, "log_level": "warning"})
    assert result["applied"] == ["cache.ttl_s", "log_level"]
    assert result["on_restart"] == ["batching.max_batch_size"]
    assert settings.cache.ttl_s == 30.0
    assert settings.batching.max_batch_size == 32
    assert stored(home) == {
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
        ({"models.Not-A-Name.max_batch_size": 1}, InvalidInput),
        ({"models.digits.cache": "sometimes"}, InvalidInput),
        # issue 14, item 5: paths, hosts and secrets by their type; sizes and deadlines bounded
        ({"cache.path": "/tmp/keys.sqlite"}, Forbidden),
        ({"jobs.path": "/tmp/jobs.sqlite"}, Forbidden),
        ({"jobs.redis_url": "redis://elsewhere:6379/0"}, Forbidden),
        ({"max_body_bytes": 1e15}, InvalidInput),
        ({"max_header_bytes": 1e12}, InvalidInput),
        ({"cache.memory_bytes": 1e15}, InvalidInput),
        ({"request_timeout_s": math.inf}, InvalidInput),
        ({"request_timeout_s": math.nan}, InvalidInput),
        ({"default_model": 'x"\n[security]\nauth = false'}, InvalidInput),
        ({"models.digits.max_batch_size": None}, InvalidInput),
    ],
)
def test_refused_changes_change_nothing(home: Path, changes: dict[str, Any], error: type[Exception]) -> None:
    settings = load_settings()
    change(settings, {"cache.ttl_s": 5})
    with pytest.raises(error):
        change(settings, {"request_timeout_s": 9, **changes})
    assert stored(home) == {"cache": {"ttl_s": 5.0}}
    assert settings.request_timeout_s == 30.0


def _fields(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf setting of `model` as (dotted key, annotation); per-model overrides as `models.m.*`."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        kinds = [k for k in (info.annotation, *get_args(info.annotation)) if isinstance(k, type)]
        nested = next((k for k in kinds if issubclass(k, BaseModel)), None)
        if key == "models":
            yield from _fields(ModelOverrides, "models.m.")
        elif nested is not None:
            yield from _fields(nested, key + ".")
        else:
            yield key, info.annotation


SETTINGS = dict(_fields(Settings))
PLACES = [key for key, kind in SETTINGS.items() if "Path" in str(kind) or "Secret" in str(kind)]
NUMBERS = [
    key
    for key, kind in SETTINGS.items()
    if key.split(".")[0] not in LOCAL_ONLY and {int, float} & {kind, *get_args(kind)} and kind is not bool
]


def test_the_settings_walk_finds_what_it_should() -> None:
    assert {"cache.path", "jobs.path", "jobs.redis_url", "logs.key", "security.jwt.secret"} <= set(PLACES)
    assert {"max_body_bytes", "cache.memory_bytes", "request_timeout_s", "models.m.max_queue_size"} <= set(
        NUMBERS
    )


@pytest.mark.parametrize("key", PLACES)
def test_every_path_and_secret_is_refused_by_its_type(home: Path, key: str) -> None:
    with pytest.raises(Forbidden):
        change(load_settings(), {key: "/tmp/x" if "Path" in str(SETTINGS[key]) else "s" * 40})
    assert not remote_path(home).exists()


@pytest.mark.parametrize("key", NUMBERS)
@pytest.mark.parametrize("value", [10**18, 1e300, math.inf, math.nan, -math.inf])
def test_every_number_a_remote_change_may_set_is_bounded_and_finite(
    home: Path, key: str, value: float
) -> None:
    with pytest.raises(InvalidInput, match=key.replace(".", r"\.")):
        change(load_settings(), {key: value})
    assert not remote_path(home).exists()


def test_a_change_is_checked_against_the_operators_file_as_the_next_start_reads_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's own file broke since it started: the next start would fail, so nothing is written."""
    config = tmp_path / "node.toml"
    config.write_text("[jobs]\nreserved = 1\n")
    monkeypatch.setenv("EDGEGEN_CONFIG", str(config))
    settings = load_settings()
    config.write_text("[jobs]\nreserved = 1\nnot_a_setting = 2\n")
    with pytest.raises(Unprocessable, match="config file") as refused:
        change(settings, {"cache.ttl_s": 9})
    assert str(tmp_path) not in str(refused.value)
    assert not remote_path(home).exists()


def test_nothing_to_change(home: Path) -> None:
    with pytest.raises(InvalidInput):
        change(load_settings(), {})


def test_what_the_environment_sets_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEGEN_CACHE__TTL_S", "10")
    with pytest.raises(Forbidden, match="EDGEGEN_CACHE__TTL_S"):
        change(load_settings(), {"cache.ttl_s": 20})


def test_a_bad_remote_file_is_passed_over_for_the_last_good_one_loudly(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    change(load_settings(), {"cache.ttl_s": 60})
    change(load_settings(), {"cache.ttl_s": 61})  # keeps the first as the last good file
    assert tomllib.loads(remote_path(home).with_name("remote.toml.last-good").read_text()) == {
        "cache": {"ttl_s": 60.0}
    }
    remote_path(home).write_text('cache = { path = "/x/keys.sqlite" }\n')  # written before the fix
    with caplog.at_level(logging.ERROR, "edgegen.config"):
        assert load_settings().cache.ttl_s == 60.0
    assert "cache.path" in caplog.text
    assert "starting with the last good ones" in caplog.text
    view = effective(load_settings())
    assert view["remote"] == {"cache": {"ttl_s": 60.0}}
    assert view["remote_problems"]
    assert str(home) not in str(view["remote_problems"])
    change(load_settings(), {"cache.ttl_s": 62})  # over the last good ones; the bad file is not kept
    assert stored(home) == {"cache": {"ttl_s": 62.0}}
    assert "60.0" in remote_path(home).with_name("remote.toml.last-good").read_text()


def test_with_no_good_remote_file_the_node_starts_without_remote_changes(
    home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    remote_path(home).parent.mkdir(parents=True)
    remote_path(home).write_text("max_body_bytes = 1_000_000_000_000_000\n")
    remote_path(home).with_name("remote.toml.last-good").write_text("cache = [\n")
    with caplog.at_level(logging.ERROR, "edgegen.config"):
        settings = load_settings()
    assert settings.max_body_bytes == 8 * 2**20
    assert "starting without remote changes" in caplog.text


def test_another_worker_takes_the_live_settings(home: Path) -> None:
    mine, theirs = load_settings(), load_settings()  # two processes of one node
    change(mine, {"cache.ttl_s": 7, "batching.max_batch_size": 3})
    assert theirs.cache.ttl_s == 3600.0
    assert apply_live(theirs) == ["cache.ttl_s"]
    assert (theirs.cache.ttl_s, theirs.batching.max_batch_size) == (7.0, 32)
    assert apply_live(theirs) == []  # nothing new


async def watched(settings: Settings, value: Callable[[], float], want: float) -> float:
    """`value()` once the watch on `settings` made it `want`, or after 3 s."""
    task = asyncio.create_task(watch(settings, 0.01))
    for _ in range(300):
        if value() == want:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    return value()


def test_the_watch_applies_what_another_worker_wrote(home: Path) -> None:
    async def run() -> float:
        settings, other = load_settings(), load_settings()
        waiting = asyncio.create_task(watched(settings, lambda: settings.llm.timeout_s, 12))
        await asyncio.sleep(0.05)
        change(other, {"llm.timeout_s": 12})
        return await waiting

    assert asyncio.run(run()) == 12.0


def test_of_two_changes_at_once_the_one_written_last_is_the_one_in_force(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two PATCHes at once, each in a thread of its own (node/admin.py): the first, between writing the file
    and applying its value, gives the second every chance to run to its end. The second's value, which
    the file keeps, is the one in force after both; before, the first applied its older value last."""
    settings = load_settings()
    applying, second_done = threading.Event(), threading.Event()
    real_set = remote_config._set

    def set_slowly(key: str, holder: BaseModel, name: str, value: Any) -> None:
        if value == 20.0:  # the first change: the second may finish first (it cannot if it must wait)
            applying.set()
            second_done.wait(0.5)
        real_set(key, holder, name, value)

    monkeypatch.setattr(remote_config, "_set", set_slowly)
    first = threading.Thread(target=change, args=(settings, {"request_timeout_s": 20}))
    first.start()
    assert applying.wait(10)
    second = threading.Thread(target=lambda: (change(settings, {"request_timeout_s": 30}), second_done.set()))
    second.start()
    first.join(10)
    second.join(10)
    assert stored(home)["request_timeout_s"] == 30.0
    assert settings.request_timeout_s == 30.0


def test_the_watch_never_applies_a_file_older_than_a_change_made_meanwhile(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker wrote 20; this worker's watch reads it, and this worker's own change to 30 lands
    before the watch applies what it read. The watch must not put 20 back: the file says 30."""
    settings, other = load_settings(), load_settings()
    change(other, {"request_timeout_s": 20})
    changed = threading.Event()
    real_in_force = remote_config.in_force

    def read_then_wait(read: Settings) -> Any:
        found = real_in_force(read)
        threading.Thread(target=lambda: (change(settings, {"request_timeout_s": 30}), changed.set())).start()
        changed.wait(0.5)  # (with the file read under the changes' lock, the change waits for the watch)
        return found

    monkeypatch.setattr(remote_config, "in_force", read_then_wait)
    apply_live(settings)
    assert changed.wait(10)
    assert stored(home)["request_timeout_s"] == 30.0
    assert settings.request_timeout_s == 30.0


def test_a_change_another_worker_took_before_this_ones_watch_began_is_applied(home: Path) -> None:
    """Two workers read their settings at start; a PATCH reaches one of them while the other still loads
    its models, before its watch begins. That watch's first look applies it. Before, it took the file's
    time as it found it at its start as seen, and the other worker kept the old value for good."""

    async def run() -> float:
        mine, theirs = load_settings(), load_settings()
        change(mine, {"cache.ttl_s": 11})
        return await watched(theirs, lambda: theirs.cache.ttl_s, 11)

    assert asyncio.run(run()) == 11.0
