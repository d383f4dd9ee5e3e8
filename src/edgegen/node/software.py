"""Upgrading edgegen itself on a node: a signed wheel goes into a new environment beside the running one,
the node switches into it on trial, and the new version stays only once it is confirmed healthy.

    HOME/software/state.json    which environment runs, the one before it, what is on trial
    HOME/software/wheels/       the wheels received, each with its signature (`<wheel>.sig`)
    HOME/software/envs/<id>/    one environment per wheel; <id> = <version>-<8 hex digits of its sha256>

A new environment holds edgegen alone. The packages it depends on are those of the first install
("base", what systemd or a terminal starts), reached through one `.pth` line, so a node needs no
package index; a wheel that needs a package the node lacks is refused before anything switches.

The path of an upgrade (the gateway runs it node by node, `gateway/upgrade.py`):
1. stage: the signature is checked (always, `software_trust`: this is code the node will run), the wheel
   kept, the environment made, edgegen installed into it by pip (`--no-index`), the new version
   imported once by its own interpreter.
2. switch: the trial is recorded; the server stops gracefully (in-flight requests finish) and the
   process replaces itself with the new environment's interpreter, same command line.
3. boot (first thing of every `edgegen serve`): a process moves into the environment it should run —
   the one on trial while it is switching, else `current`. A process of the trial has `trial_s` to be
   confirmed.
4. confirm (by the gateway once its health gate passed): the trial's environment becomes `current`.
   A trial that is not confirmed in time, whose server fails to start, that is rolled back, or that
   stops: the node goes back to `current`, and `last_failure` says why.

`state.json` (written under a lock, replaced atomically): `base` (the first install's interpreter),
`current` and `previous` ("base" or an id), `trial` ({env, from, status: switching|running, deadline})
and `exec` ({pid, env}: the process `pid`, once its server has stopped, becomes `env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess  # nosec B404
import sys
import sysconfig
import time
import venv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from packaging.version import InvalidVersion, Version

from edgegen.errors import ConfigError, Conflict, IntegrityError, InvalidInput, ModelNotFound, Unprocessable

if TYPE_CHECKING:
    from edgegen.config import Settings

log = logging.getLogger("edgegen.software")
BASE = "base"
# A pure-Python wheel of edgegen (PEP 427 file name; the version's own dashes are underscores).
WHEEL_NAME = re.compile(
    r"edgegen-(?P<version>[0-9][0-9A-Za-z._+!]{0,62})(-[0-9][0-9A-Za-z._]{0,30})?-py3-none-any\.whl"
)
ENV_ID = re.compile(r"[0-9][0-9A-Za-z._+!]{0,62}-[0-9a-f]{8}")
BASE_PTH = "edgegen-base.pth"  # in a new environment: the base install's package directories
MARKER = "edgegen-env.json"  # written last: an environment without it is unfinished
STEP_TIMEOUT_S = 600.0


def root(home: Path) -> Path:
    return home / "software"


def _empty() -> dict[str, Any]:
    return {
        "base": None,
        "current": BASE,
        "previous": None,
        "trial": None,
        "exec": None,
        "last_failure": None,
    }


def read_state(home: Path) -> dict[str, Any]:
    try:
        saved: dict[str, Any] = orjson.loads((root(home) / "state.json").read_bytes())
    except FileNotFoundError:
        return _empty()
    return _empty() | saved


@contextlib.contextmanager
def _state(home: Path) -> Iterator[dict[str, Any]]:
    """The state, to change under the lock (worker processes and the supervisor share it)."""
    folder = root(home)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "state.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state(home)
        before = orjson.dumps(state)
        yield state
        if orjson.dumps(state) != before:
            staging = folder / "state.json.tmp"
            with open(staging, "wb") as out:
                out.write(orjson.dumps(state, option=orjson.OPT_INDENT_2))
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, folder / "state.json")


def running_env(home: Path) -> str:
    """The environment this process runs in: an id under HOME/software/envs, else the base install."""
    prefix = Path(sys.prefix).resolve()
    return prefix.name if prefix.parent == (root(home) / "envs").resolve() else BASE


def _python(home: Path, state: dict[str, Any], env: str) -> Path | None:
    if env == BASE:
        return Path(state["base"]) if state["base"] else None
    return root(home) / "envs" / env / "bin" / "python"


def _fail(state: dict[str, Any], reason: str) -> None:
    trial = state["trial"]
    state["last_failure"] = {"env": trial["env"], "reason": reason, "at": time.time()}
    state["trial"] = None
    log.error(
        "software trial failed: back to the current version", extra={"env": trial["env"], "reason": reason}
    )


def boot(settings: Settings) -> Path | None:
    """First thing `edgegen serve` does: the interpreter to become (None: stay in this one)."""
    home = settings.home
    with _state(home) as state:
        here = running_env(home)
        if here == BASE:
            state["base"] = sys.executable
        if state["exec"] is not None and state["exec"]["env"] == here:
            state["exec"] = None  # arrived
        trial = state["trial"]
        if trial is not None and trial["env"] == here:
            if trial["status"] == "switching":
                trial["status"], trial["deadline"] = "running", time.time() + settings.software.trial_s
                log.info("software trial begins", extra={"env": here, "trial_s": settings.software.trial_s})
            return None
        if trial is not None and trial["status"] == "running":
            _fail(state, "the new version stopped before it was confirmed")
            trial = None
        target = trial["env"] if trial is not None else state["current"]
        if target == here:
            return None
        python = _python(home, state, target)
        if python is None or not python.exists():
            if trial is not None:
                _fail(state, f"environment {target} has no interpreter")
            else:
                log.error("the current environment is gone: running this one", extra={"env": target})
            return None
        return python


def exec_target(home: Path) -> Path | None:
    """After this process's server stopped: the interpreter it was asked to become, if any."""
    state = read_state(home)
    order = state["exec"]
    if order is None or order["pid"] != os.getpid():
        return None
    return _python(home, state, order["env"])


def on_trial(home: Path) -> bool:
    """Whether this process is a new version on trial, not yet confirmed."""
    trial = read_state(home)["trial"]
    return trial is not None and trial["status"] == "running" and trial["env"] == running_env(home)


def abandon(home: Path, reason: str, pid: int) -> bool:
    """Leave the trial this process runs (if it does): process `pid` then becomes the current version."""
    with _state(home) as state:
        trial = state["trial"]
        if trial is None or trial["env"] != running_env(home):
            return False
        _fail(state, reason)
        state["exec"] = {"pid": pid, "env": state["current"]}
        return True


# -- staging ------------------------------------------------------------------------------------------------
def stage(settings: Settings, filename: str, wheel: bytes, signature: bytes) -> dict[str, Any]:
    """Check, keep and install a wheel into an environment of its own; nothing switches yet."""
    from edgegen.security.signing import software_trust

    match = WHEEL_NAME.fullmatch(filename)
    if match is None:
        raise InvalidInput("not an edgegen wheel: expected edgegen-<version>-py3-none-any.whl")
    try:
        version = Version(match["version"].replace("_", "-"))
    except InvalidVersion:
        raise InvalidInput(f"{filename}: not a valid version") from None
    try:
        signer = software_trust(settings).check(signature, wheel, filename)
    except (IntegrityError, ConfigError) as exc:
        raise Unprocessable(str(exc)) from None
    digest = hashlib.sha256(wheel).hexdigest()
    env_id = f"{version}-{digest[:8]}"
    folder = root(settings.home)
    wheels = folder / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / filename
    env = folder / "envs" / env_id
    began = time.monotonic()
    with open(folder / "stage.lock", "a") as lock:  # one staging at a time, across worker processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        reused = (env / MARKER).exists()
        if not reused:
            _write_atomic(path, wheel)
            _write_atomic(path.with_name(filename + ".sig"), signature)
            _make_env(env, path, version)
            made = {"version": str(version), "sha256": digest, "wheel": filename, "signer": signer}
            _write_atomic(env / MARKER, orjson.dumps(made | {"made_at": time.time()}))
            log.info("software staged", extra={"env": env_id, "version": str(version), "signer": signer})
        prune(settings)
    return {"env": env_id, "version": str(version), "signer": signer, "reused": reused,
            "took_s": round(time.monotonic() - began, 3)}  # fmt: skip


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(path.name + ".tmp")
    staging.write_bytes(data)
    os.replace(staging, path)


def _site_dirs(prefix: Path) -> list[str]:
    paths = sysconfig.get_paths(vars={"base": str(prefix), "platbase": str(prefix)})
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _base_dirs() -> list[str]:
    """The package directories of the base install, seen from this process (which may be a new version)."""
    own = _site_dirs(Path(sys.prefix))
    pth = Path(own[0]) / BASE_PTH
    if pth.exists():
        return [line for line in pth.read_text().splitlines() if line.strip()]
    return own


def _make_env(env: Path, wheel: Path, version: Version) -> None:
    if env.exists():
        shutil.rmtree(env)  # an environment left unfinished
    try:
        venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env)
        Path(_site_dirs(env)[0], BASE_PTH).write_text("\n".join(_base_dirs()) + "\n")
        python = env / "bin" / "python"
        clean = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_INDEX_URL")
        }
        pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
        offline = ["--no-index", "--no-input", "--no-cache-dir", "--find-links", str(wheel.parent)]
        _run([*pip, "install", *offline, f"{wheel}[node]"], clean, "installing the wheel")
        said = _run(
            [str(python), "-c", "import edgegen, edgegen.node.app, edgegen.cli; print(edgegen.__version__)"],
            clean, "importing the new version",
        ).strip()  # fmt: skip
        if Version(said) != version:
            raise Unprocessable(f"the wheel says version {version}, its code says {said}")
    except BaseException:
        shutil.rmtree(env, ignore_errors=True)
        raise


def _run(command: list[str], env: dict[str, str], what: str) -> str:
    try:
        done = subprocess.run(  # (our interpreters, our arguments)  # nosec B603
            command, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise Unprocessable(f"{what} took longer than {STEP_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-3:]
        log.error("software staging failed", extra={"step": what, "output": done.stderr[-4000:]})
        raise Unprocessable(f"{what} failed: {' '.join(last)[:500]}")
    return done.stdout


def prune(settings: Settings) -> None:
    """Beyond `keep`, the oldest environments (and their wheels) go; current, previous and trial stay."""
    folder = root(settings.home)
    state = read_state(settings.home)
    trial = state["trial"]
    wanted = {
        state["current"],
        state["previous"],
        trial["env"] if trial else None,
        running_env(settings.home),
    }
    made = sorted(environments(settings.home), key=lambda e: e["made_at"], reverse=True)
    spare = [e for e in made if e["env"] not in wanted]
    for old in spare[settings.software.keep :]:
        shutil.rmtree(folder / "envs" / old["env"], ignore_errors=True)
        for path in (folder / "wheels" / old["wheel"], folder / "wheels" / (old["wheel"] + ".sig")):
            path.unlink(missing_ok=True)
        log.info("software environment removed", extra={"env": old["env"]})


def environments(home: Path) -> list[dict[str, Any]]:
    found = []
    envs = root(home) / "envs"
    for marker in sorted(envs.glob(f"*/{MARKER}")) if envs.exists() else []:
        try:
            found.append({"env": marker.parent.name, **orjson.loads(marker.read_bytes())})
        except orjson.JSONDecodeError:
            continue
    return found


# -- switching ----------------------------------------------------------------------------------------------
def switch(home: Path, env: str, pid: int) -> dict[str, Any]:
    """Put `env` on trial: process `pid` (the top one) becomes it once its server has stopped."""
    if env != BASE and ENV_ID.fullmatch(env) is None:
        raise InvalidInput("not an environment id")
    with _state(home) as state:
        here = running_env(home)
        if state["trial"] is not None:
            raise Conflict(
                f"environment {state['trial']['env']} is on trial already; confirm or roll it back"
            )
        if env == here:
            raise Conflict(f"environment {env} runs already")
        python = _python(home, state, env)
        if (
            python is None
            or not python.exists()
            or (env != BASE and not (root(home) / "envs" / env / MARKER).exists())
        ):
            raise ModelNotFound(f"no environment {env} on this node")
        state["trial"] = {
            "env": env,
            "from": here,
            "status": "switching",
            "asked_at": time.time(),
            "deadline": None,
        }
        state["exec"] = {"pid": pid, "env": env}
    log.info("software switch asked", extra={"env": env, "from": here})
    return {"switching": True, "env": env, "from": here}


def confirm(home: Path) -> dict[str, Any]:
    """The version on trial in this process passed its health gate: it becomes the current one."""
    with _state(home) as state:
        trial, here = state["trial"], running_env(home)
        if trial is None or trial["env"] != here or trial["status"] != "running":
            raise Conflict("no version of this process is on trial")
        state["previous"], state["current"], state["trial"] = trial["from"], here, None
        state["last_failure"] = None
    log.info("software confirmed", extra={"env": here, "previous": trial["from"]})
    return {"confirmed": True, "env": here, "previous": trial["from"]}


def rollback(home: Path, pid: int) -> dict[str, Any]:
    """Leave the trial this process runs, or else put the previous environment on trial."""
    if abandon(home, "rolled back by an operator", pid):
        return {"switching": True, "env": read_state(home)["current"], "abandoned": running_env(home)}
    previous = read_state(home)["previous"]
    if previous is None:
        raise Conflict("no previous environment to go back to")
    return switch(home, previous, pid)


async def watch_trial(home: Path, pid: int, stop: Callable[[], None]) -> None:
    """While this process is on trial: unconfirmed when its time is up, it leaves (back to `current`)."""
    while on_trial(home):
        deadline = read_state(home)["trial"]["deadline"]
        if time.time() >= deadline:
            if abandon(home, "not confirmed healthy in time", pid):
                stop()
            return
        await asyncio.sleep(min(1.0, max(0.05, deadline - time.time())))


def view(home: Path) -> dict[str, Any]:
    from edgegen import __version__

    state = read_state(home)
    return {
        "running": running_env(home),
        "version": __version__,
        "current": state["current"],
        "previous": state["previous"],
        "trial": state["trial"],
        "last_failure": state["last_failure"],
        "environments": environments(home),
    }
