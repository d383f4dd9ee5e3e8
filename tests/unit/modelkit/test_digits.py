"""The default model's data: the pinned file from wherever it is found, and a split that is fixed."""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgegen.errors import IntegrityError, StoreError
from edgegen.modelkit import digits

SKLEARN_COPY = digits._installed_copy()


def wheel_download(member_bytes: bytes, calls: list[str]) -> digits.Download:
    """pip's part played by a real wheel (a zip) holding `member_bytes` where scikit-learn keeps the file."""

    def download(requirement: str, dest: Path) -> None:
        calls.append(requirement)
        with zipfile.ZipFile(dest / "scikit_learn-1.9.1-py3-none-any.whl", "w") as wheel:
            wheel.writestr("sklearn/__init__.py", "")
            wheel.writestr("sklearn/datasets/data/digits.csv.gz", member_bytes)

    return download


@pytest.fixture
def no_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's environment: scikit-learn is not installed."""
    monkeypatch.setattr(digits, "_installed_copy", lambda: None)


def test_the_installed_copy_is_the_pinned_one() -> None:
    assert SKLEARN_COPY is not None  # the test environment has scikit-learn (the optimize extra)
    assert digits._checked_csv(SKLEARN_COPY.read_bytes(), "sklearn").count(b"\n") == 1797


@pytest.mark.usefixtures("no_sklearn")
def test_without_sklearn_the_file_comes_from_its_wheel_once(tmp_path: Path) -> None:
    assert SKLEARN_COPY is not None
    calls: list[str] = []
    download = wheel_download(SKLEARN_COPY.read_bytes(), calls)
    first = digits.digits_csv(tmp_path, download)
    assert calls == [digits.SKLEARN]
    assert digits.digits_csv(tmp_path, download) == first
    assert calls == [digits.SKLEARN]  # the second read is the cache's
    assert sorted(p.name for p in tmp_path.iterdir()) == [digits.DATA_FILE]  # the wheel is not kept


@pytest.mark.usefixtures("no_sklearn")
@pytest.mark.parametrize(
    "member",
    [
        gzip.compress(b"0,1,2\n"),  # another data set
        gzip.compress(b"0," * (1 << 20)),  # one that inflates past any digits file
        b"not gzip at all",
    ],
)
def test_a_wheel_with_other_data_is_refused_and_nothing_is_cached(tmp_path: Path, member: bytes) -> None:
    with pytest.raises(IntegrityError, match="not the digits data set"):
        digits.digits_csv(tmp_path, wheel_download(member, []))
    assert not (tmp_path / digits.DATA_FILE).exists()


def test_a_tampered_cache_is_refused(tmp_path: Path) -> None:
    (tmp_path / digits.DATA_FILE).write_bytes(gzip.compress(b"1,2,3\n"))
    with pytest.raises(IntegrityError, match="not the digits data set"):
        digits.digits_csv(tmp_path)


@pytest.mark.usefixtures("no_sklearn")
def test_without_sklearn_or_a_cache_dir_the_error_says_what_to_do() -> None:
    with pytest.raises(StoreError, match="install it, or give a cache directory"):
        digits.digits_csv(None)


def test_the_split_is_stratified_and_fixed() -> None:
    split = digits.load_split(seed=0)
    again = digits.load_split(seed=0)
    assert len(split.y_test) == 359
    assert len(split.y_train) == 1438
    np.testing.assert_array_equal(split.x_test, again.x_test)
    for label in range(10):  # each class held out in the same proportion
        share = (split.y_test == label).sum() / (
            (split.y_test == label).sum() + (split.y_train == label).sum()
        )
        assert abs(share - 0.2) < 0.01
    assert not np.array_equal(digits.load_split(seed=1).y_test, split.y_test)


def test_numpy_training_learns_the_task_and_repeats_itself() -> None:
    split = digits.load_split(seed=0)
    small = digits.train_mlp(split, hidden=128, epochs=10)
    assert digits.accuracy(small, split) >= 0.92  # the served 800-wide model: tests/e2e/test_cli.py
    again = digits.train_mlp(split, hidden=128, epochs=10)
    for a, b in zip(small, again, strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
    # The 1/16 is folded into the first layer: raw 0-16 pixels in, the same logits as scaled pixels.
    assert small[0].weight.dtype == np.float32
    assert small[0].in_features == 64
