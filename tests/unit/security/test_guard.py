"""The intrusion guard bans bursts of failures and scanning, for longer each time, and forgets slowly."""

from __future__ import annotations

from urllib.parse import unquote

import pytest

from edgegen.security.guard import IntrusionGuard, looks_like_scanning


def test_a_burst_of_failures_bans_and_the_ban_runs_out() -> None:
    guard = IntrusionGuard(max_failures=3, window_s=10, ban_s=60)
    assert not guard.failure("1.2.3.4", 0.0)
    assert not guard.failure("1.2.3.4", 1.0)
    assert guard.failure("1.2.3.4", 2.0)
    assert guard.banned_for("1.2.3.4", 2.0) == 60.0
    assert guard.banned_for("5.6.7.8", 2.0) == 0.0  # others are not touched
    assert guard.banned_for("1.2.3.4", 62.0) == 0.0
    assert guard.bans == 1


def test_failures_spread_beyond_the_window_do_not_ban() -> None:
    guard = IntrusionGuard(max_failures=3, window_s=10, ban_s=60)
    assert not any(guard.failure("c", t) for t in (0.0, 6.0, 12.0, 18.0, 24.0))


def test_bans_double_for_a_repeat_offender_up_to_the_cap() -> None:
    guard = IntrusionGuard(max_failures=1, window_s=10, ban_s=60, max_ban_s=150)
    now = 0.0
    lengths = []
    for _ in range(4):
        assert guard.failure("c", now)
        lengths.append(guard.banned_for("c", now))
        now += lengths[-1]
    assert lengths == [60.0, 120.0, 150.0, 150.0]
    assert not guard.failure("c", now - 1)  # during a ban nothing more is counted


@pytest.mark.parametrize(
    ("path", "scanning"),
    [
        ("/models/../../etc/passwd/predict", True),
        ("/models/%2e%2e%2fsecret/predict", True),
        ("/models/%252e%252e/predict", True),
        ("/.env", True),
        ("/.git/config", True),
        ("/wp-login.php", True),
        ("/models/x%00/predict", True),
        ("/predict", False),
        ("/v2/models/digits/infer", False),
        ("/v1/chat/completions", False),
    ],
)
def test_scanning_paths_are_recognised(path: str, scanning: bool) -> None:
    assert looks_like_scanning(path.encode(), unquote(path), b"") is scanning
    assert looks_like_scanning(b"/predict", "/predict", path.encode()) is scanning  # in the query too


def test_memory_is_bounded() -> None:
    guard = IntrusionGuard(max_failures=5, max_clients=100)
    for i in range(1000):
        guard.failure(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(guard) == 100
