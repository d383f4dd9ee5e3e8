"""The software state of a node (node/software.py): what a process becomes at boot, trials that fail,
switches that are refused, staging a real wheel, and which environments pruning keeps."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import orjson
import pytest

from edgegen.config import Settings
from edgegen.errors import Conflict, InvalidInput, ModelNotFound, Unprocessable
from edgegen.node import software
from edgegen.security.signing import Signer
from tests.software_wheel import build_wheel


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(home=tmp_path / "home")


def fake_env(home: Path, env: str, made_at: float = 0.0) -> Path:
    """An environment as staging leaves it: an interpreter (this one) and its marker."""
    folder = software.root(home) / "envs" / env
    (folder / "bin").mkdir(parents=True)
    (folder / "bin" / "python").symlink_to(sys.executable)
    marker = {"version": env.split("-")[0], "wheel": f"edgegen-{env}.whl", "made_at": made_at}
    (folder / software.MARKER).write_bytes(orjson.dumps(marker))
    return folder / "bin" / "python"


def write_state(home: Path, **fields: object) -> None:
    software.root(home).mkdir(parents=True, exist_ok=True)
    (software.root(home) / "state.json").write_bytes(orjson.dumps(software.read_state(home) | fields))


def test_a_fresh_node_stays_and_remembers_its_base_interpreter(settings: Settings) -> None:
    assert software.boot(settings) is None
    state = software.read_state(settings.home)
    assert state["base"] == sys.executable
    assert state["current"] == software.BASE


def test_a_node_moves_to_its_current_environment_or_to_one_switching_in(settings: Settings) -> None:
    python = fake_env(settings.home, "0.2.0-aaaaaaaa")
    write_state(settings.home, current="0.2.0-aaaaaaaa")
    assert software.boot(settings) == python
    trial = {"env": "0.2.0-aaaaaaaa", "from": "base", "status": "switching", "deadline": None}
    write_state(settings.home, current="base", trial=trial)
    assert software.boot(settings) == python


def test_a_trial_that_stopped_unconfirmed_fails_and_the_node_goes_back(settings: Settings) -> None:
    fake_env(settings.home, "0.2.0-aaaaaaaa")
    trial = {"env": "0.2.0-aaaaaaaa", "from": "base", "status": "running", "deadline": time.time() + 60}
    write_state(settings.home, trial=trial)
    assert software.boot(settings) is None  # current is this base install: stay
    state = software.read_state(settings.home)
    assert state["trial"] is None
    assert state["last_failure"]["env"] == "0.2.0-aaaaaaaa"
    assert "before it was confirmed" in state["last_failure"]["reason"]


def test_a_trial_whose_environment_is_gone_fails_at_boot(settings: Settings) -> None:
    trial = {"env": "0.2.0-bbbbbbbb", "from": "base", "status": "switching", "deadline": None}
    write_state(settings.home, trial=trial)
    assert software.boot(settings) is None
    assert "no interpreter" in software.read_state(settings.home)["last_failure"]["reason"]


def test_only_the_process_asked_becomes_another_environment(settings: Settings) -> None:
    python = fake_env(settings.home, "0.2.0-aaaaaaaa")
    software.boot(settings)
    assert software.switch(settings.home, "0.2.0-aaaaaaaa", os.getpid())["switching"]
    assert software.exec_target(settings.home) == python
    write_state(settings.home, exec={"pid": os.getpid() + 1, "env": "0.2.0-aaaaaaaa"})
    assert software.exec_target(settings.home) is None  # (another process's switch)


def test_switches_that_cannot_be_made_are_refused(settings: Settings) -> None:
    fake_env(settings.home, "0.2.0-aaaaaaaa")
    software.boot(settings)
    with pytest.raises(InvalidInput):
        software.switch(settings.home, "../../bin", 1)
    with pytest.raises(ModelNotFound):
        software.switch(settings.home, "9.9.9-00000000", 1)
    with pytest.raises(Conflict):
        software.switch(settings.home, software.BASE, 1)  # runs already
    with pytest.raises(Conflict):
        software.confirm(settings.home)  # nothing on trial
    with pytest.raises(Conflict):
        software.rollback(settings.home, 1)  # no previous environment
    software.switch(settings.home, "0.2.0-aaaaaaaa", 1)
    with pytest.raises(Conflict):
        software.switch(settings.home, "0.2.0-aaaaaaaa", 1)  # one trial at a time


def test_a_wheel_is_staged_once_and_refused_unsigned_tampered_or_misnamed(
    settings: Settings, tmp_path: Path
) -> None:
    wheel = build_wheel(tmp_path / "out", "0.3.0")
    data = wheel.read_bytes()
    with pytest.raises(Unprocessable, match="trusts no signing key"):
        software.stage(settings, wheel.name, data, b"{}")
    record = Signer.local(settings.home).record(data)
    with pytest.raises(Unprocessable, match="does not match"):
        software.stage(settings, wheel.name, data + b"x", record)
    for name in (
        "edgegen-0.3.0.tar.gz",
        "other-0.3.0-py3-none-any.whl",
        "edgegen-0.3.0-cp311-cp311-linux_x86_64.whl",
    ):
        with pytest.raises(InvalidInput):
            software.stage(settings, name, data, record)
    staged = software.stage(settings, wheel.name, data, record)
    assert staged["version"] == "0.3.0"
    assert not staged["reused"]
    assert software.stage(settings, wheel.name, data, record)["reused"]
    env = software.root(settings.home) / "envs" / staged["env"]
    lines = next(env.glob(f"lib/python*/site-packages/{software.BASE_PTH}")).read_text().split()
    assert lines  # the base install's packages, for the dependencies
    assert (software.root(settings.home) / "wheels" / f"{wheel.name}.sig").read_bytes() == record


def test_a_wheel_whose_code_says_another_version_is_refused(settings: Settings, tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "out", "0.3.1")
    lying = wheel.with_name("edgegen-0.3.2-py3-none-any.whl")
    wheel.rename(lying)
    data = lying.read_bytes()
    with pytest.raises(Unprocessable):
        software.stage(settings, lying.name, data, Signer.local(settings.home).record(data))
    assert not list((software.root(settings.home) / "envs").glob("0.3.2-*"))  # nothing half-made stays


def test_pruning_keeps_the_newest_and_those_in_use(settings: Settings) -> None:
    for i, env in enumerate(["0.1.1-11111111", "0.1.2-22222222", "0.1.3-33333333", "0.1.4-44444444"]):
        fake_env(settings.home, env, made_at=float(i))
    write_state(settings.home, current="0.1.1-11111111", previous="0.1.2-22222222")
    software.prune(settings.model_copy(update={"software": settings.software.model_copy(update={"keep": 1})}))
    left = sorted(e["env"] for e in software.environments(settings.home))
    assert left == ["0.1.1-11111111", "0.1.2-22222222", "0.1.4-44444444"]
