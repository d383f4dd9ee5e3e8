"""The node's default classifier, `digits`, trained here with numpy alone: no training framework.

The data are scikit-learn's bundled handwritten digits (1,797 8x8 images, grey levels 0-16, 10
classes; the UCI optdigits test set), read from the file scikit-learn ships, `digits.csv.gz`. A node
does not install scikit-learn for one 57 kB file: the file is taken from an installed scikit-learn
when there is one, else from scikit-learn's wheel fetched with pip (the package registry, never a
model hub), and kept in the wheel cache. Either way its content must match the sha256 pinned here.

The network is the seed's student, 64 -> 800 -> 800 -> 10 with ReLU, trained with Adam on
cross-entropy in minibatches. Every random choice comes from one seeded generator and the arithmetic
is float32 numpy, so two builds on one machine give the same bytes (the store then sees the same
sha256). Training sees pixels scaled to [0, 1]; the exported model folds that 1/16 into the first
layer, so a client sends the pixels exactly as `load_digits().data` holds them.

    >>> split = load_split(cache_dir=Path("cache"))                     # doctest: +SKIP
    >>> layers = train_mlp(split)                # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import subprocess  # nosec B404
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgegen.errors import IntegrityError, StoreError
from edgegen.modelkit.layers import DenseLayer, mlp_forward
from edgegen.modelkit.onnx_writer import mlp_to_onnx
from edgegen.modelkit.tflite_writer import mlp_to_tflite
from edgegen.store import ModelStore
from edgegen.store.pull import Download, pip_download

PIXEL_MAX = 16.0
STUDENT_HIDDEN = 800
DATA_FILE = "digits.csv.gz"
_MEMBER = "sklearn/datasets/data/digits.csv.gz"
# The wheel the file is taken from when no scikit-learn is installed (any platform's wheel carries it).
SKLEARN = "scikit-learn==1.9.1"
# sha256 of the decompressed CSV (1,797 rows of 64 pixels and a label), as scikit-learn 1.4 to 1.9 ship it.
DATA_SHA256 = "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8"
_MAX_DATA_BYTES = 1 << 20  # the CSV is ~520 kB; a member that inflates past this is not it


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray  # (N, 64) float32, grey levels 0-16
    y_train: np.ndarray  # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray


def _checked_csv(compressed: bytes, origin: str) -> bytes:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as stream:
            text = stream.read(_MAX_DATA_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        raise IntegrityError(f"{origin} is not a gzip file: not the digits data set edgegen pins") from None
    if len(text) > _MAX_DATA_BYTES or hashlib.sha256(text).hexdigest() != DATA_SHA256:
        raise IntegrityError(f"{origin} is not the digits data set edgegen pins (sha256 {DATA_SHA256})")
    return text


def _installed_copy() -> Path | None:
    """scikit-learn's own copy, found without importing scikit-learn (a second or more of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), "datasets", "data", DATA_FILE)
    return path if path.is_file() else None


def _from_wheel(cache_dir: Path, download: Download) -> bytes:
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        download(SKLEARN, Path(tmp))
        wheels = sorted(Path(tmp).glob("scikit_learn-*.whl"))
        if len(wheels) != 1:
            raise StoreError(f"pip saved no single scikit-learn wheel for {SKLEARN}")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel:
                info = wheel.getinfo(_MEMBER)
                if info.file_size > _MAX_DATA_BYTES:
                    raise IntegrityError(f"{SKLEARN}'s {_MEMBER} is {info.file_size} bytes, not the data set")
                return wheel.read(info)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise IntegrityError(f"{SKLEARN}'s wheel has no readable {_MEMBER}: {exc}") from None


def digits_csv(cache_dir: Path | None = None, download: Download = pip_download) -> bytes:
    """The pinned CSV: from `cache_dir`, an installed scikit-learn, or scikit-learn's wheel (then cached).

    Without a `cache_dir`, only an installed scikit-learn is looked at (StoreError when there is none).
    """
    cached = cache_dir / DATA_FILE if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return _checked_csv(cached.read_bytes(), str(cached))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
    installed = _installed_copy()
    if installed is not None:
        compressed = installed.read_bytes()
        text = _checked_csv(compressed, str(installed))
    elif cached is None:
        raise StoreError(
            "the digits data comes from scikit-learn: install it, or give a cache directory to fetch its "
            "wheel into"
        )
    else:
        compressed = _from_wheel(cached.parent, download)
        text = _checked_csv(compressed, f"{SKLEARN}'s {_MEMBER}")
    if cached is not None:
        partial = cached.with_suffix(".partial")
        partial.write_bytes(compressed)
        partial.replace(cached)
    return text


def load_split(test_size: float = 0.2, seed: int = 0, cache_dir: Path | None = None) -> Split:
    """A stratified split: `test_size` of each class held out, chosen by a generator seeded with `seed`."""
    table = np.loadtxt(io.StringIO(digits_csv(cache_dir).decode()), delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test.append(members[: round(len(members) * test_size)])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[np.concatenate(test)] = True
    return Split(x[~is_test], y[~is_test], x[is_test], y[is_test])


def _init_layer(rng: np.random.Generator, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """nn.Linear's default: weight and bias uniform in ±1/sqrt(fan_in)."""
    bound = 1.0 / np.sqrt(n_in)
    weight = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
    return weight, rng.uniform(-bound, bound, n_out).astype(np.float32)


class _Adam:
    """Adam (Kingma & Ba) over a list of float32 arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], betas: tuple[float, float] = (0.9, 0.999)) -> None:
        self.params, self.betas, self.step_count = params, betas, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray], lr: float, eps: float = 1e-8) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        scale = lr * np.sqrt(1 - b2**self.step_count) / (1 - b1**self.step_count)
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= np.float32(scale) * m / (np.sqrt(v) + np.float32(eps))


def train_mlp(
    split: Split,
    *,
    hidden: int = STUDENT_HIDDEN,
    epochs: int = 25,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> list[DenseLayer]:
    """Train 64 -> hidden -> hidden -> 10 with Adam; return exportable layers taking raw 0-16 pixels."""
    rng = np.random.default_rng(seed)
    n_in, classes = split.x_train.shape[1], int(split.y_train.max()) + 1
    w1, b1 = _init_layer(rng, n_in, hidden)
    w2, b2 = _init_layer(rng, hidden, hidden)
    w3, b3 = _init_layer(rng, hidden, classes)
    params = [w1, b1, w2, b2, w3, b3]
    adam = _Adam(params)
    x_all = split.x_train / np.float32(PIXEL_MAX)
    onehot_all = np.eye(classes, dtype=np.float32)[split.y_train]
    for _ in range(epochs):
        order = rng.permutation(len(x_all))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            x, onehot = x_all[idx], onehot_all[idx]
            h1 = np.maximum(x @ w1.T + b1, 0)
            h2 = np.maximum(h1 @ w2.T + b2, 0)
            logits = h2 @ w3.T + b3
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            d3 = (probs - onehot) / np.float32(len(idx))  # d(mean cross-entropy)/d(logits)
            d2 = (d3 @ w3) * (h2 > 0)
            d1 = (d2 @ w2) * (h1 > 0)
            adam.step([d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)], lr)
    return [
        DenseLayer(np.ascontiguousarray(w1 / np.float32(PIXEL_MAX)), b1, "relu"),
        DenseLayer(w2, b2, "relu"),
        DenseLayer(w3, b3, "none"),
    ]


def accuracy(layers: list[DenseLayer], split: Split) -> float:
    """Held-out accuracy of the exported weights themselves: what a client of the node will see."""
    return float((mlp_forward(layers, split.x_test).argmax(1) == split.y_test).mean())


@dataclass(frozen=True)
class BuiltModel:
    name: str
    version: str
    test_accuracy: float


# What a BLAS thread count changes is the order of a sum, and so the last bits of the weights: the
# training runs in a child with one thread everywhere, so its bytes do not depend on the machine's cores.
_ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_FACTS = "facts.json"


def _write_models(out: Path, cache_dir: Path) -> None:
    """The child's work: train, export both formats into `out`, and say how well the export scores."""
    split = load_split(cache_dir=cache_dir)
    layers = train_mlp(split)
    (out / "digits.onnx").write_bytes(mlp_to_onnx(layers, doc="seed student MLP on sklearn digits"))
    (out / "digits.tflite").write_bytes(mlp_to_tflite(layers, description="seed student MLP"))
    (out / _FACTS).write_text(json.dumps({"test_accuracy": accuracy(layers, split)}))


def build_digits(store: ModelStore, cache_dir: Path) -> list[BuiltModel]:
    """Train the seed's student on the digits and add it to the store as `digits` and `digits-tflite`."""
    digits_csv(cache_dir)  # fetched here, where a failure is reported plainly; the child reads the cache
    with tempfile.TemporaryDirectory() as tmp:
        # This interpreter, an argv list (no shell), our own module.
        result = subprocess.run(  # nosec B603
            [sys.executable, "-m", "edgegen.modelkit.digits", tmp, str(cache_dir)],
            env={**os.environ, **_ONE_THREAD},
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            lines = result.stderr.strip().splitlines()
            raise StoreError(f"training digits failed: {lines[-1] if lines else f'exit {result.returncode}'}")
        accuracy_ = float(json.loads((Path(tmp) / _FACTS).read_text())["test_accuracy"])
        metadata: dict[str, object] = {
            "dataset": f"scikit-learn's digits ({DATA_FILE}), stratified 80/20 split, seed 0",
            "architecture": f"64-{STUDENT_HIDDEN}-{STUDENT_HIDDEN}-10 MLP (the seed's student)",
            "input": "64 grey levels 0-16 (an 8x8 image flattened row by row, as load_digits gives it)",
            "output": "10 logits, one per digit",
            "test_accuracy": round(accuracy_, 4),
            "trained_with": "numpy, Adam, 25 epochs, one BLAS thread",
        }
        return [
            BuiltModel(
                name, store.add(Path(tmp) / file, name, metadata=metadata, activate=True).version, accuracy_
            )
            for name, file in (("digits", "digits.onnx"), ("digits-tflite", "digits.tflite"))
        ]


def sample_inputs(count: int, seed: int = 0, cache_dir: Path | None = None) -> np.ndarray:
    """Held-out images (count, 64) float32, for examples, smoke tests and benchmarks."""
    return load_split(seed=seed, cache_dir=cache_dir).x_test[:count]


if __name__ == "__main__":
    _write_models(Path(sys.argv[1]), Path(sys.argv[2]))
