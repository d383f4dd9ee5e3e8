"""The executor contract: one loaded model version, one forward pass at a time.

An executor knows nothing of HTTP or queues. The engine calls `run` from a worker thread with a
batch already stacked along the first dimension, and owns any concurrency: `run` on one executor
instance is never entered twice at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from edgegen.store.manifest import TensorSpec


class Executor(Protocol):
    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass: input name -> array (B, ...), returns output name -> array (B, ...)."""
        ...

    def close(self) -> None: ...
