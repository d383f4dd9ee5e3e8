"""A framework-free description of a dense MLP, shared by the exporters and their tests.

Weights use PyTorch's ``nn.Linear`` layout, (out_features, in_features), which is also the
layout TFLite's FULLY_CONNECTED expects, so exporters can write them without transposing.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Activation = Literal["relu", "none"]
_ACTIVATIONS: tuple[str, ...] = get_args(Activation)


# eq=False: the generated __eq__/__hash__ would compare and hash ndarrays, which raises.
@dataclass(frozen=True, eq=False)
class DenseLayer:
    """``y = activation(x @ weight.T + bias)``."""

    weight: np.ndarray  # (out_features, in_features) float32, PyTorch nn.Linear layout
    bias: np.ndarray  # (out_features,) float32
    activation: Activation = "none"

    def __post_init__(self) -> None:
        w, b = self.weight, self.bias
        if not isinstance(w, np.ndarray) or not isinstance(b, np.ndarray):
            raise ValueError(
                f"DenseLayer weight and bias must be numpy arrays, got {type(w).__name__} "
                f"and {type(b).__name__}"
            )
        # Exporters write raw float32 bytes; silently casting float64 would hide a precision choice.
        if w.dtype != np.float32 or b.dtype != np.float32:
            raise ValueError(f"DenseLayer weight and bias must be float32, got {w.dtype} and {b.dtype}")
        if w.ndim != 2:
            raise ValueError(
                f"DenseLayer weight must be 2-D (out_features, in_features), got shape {w.shape}"
            )
        if w.shape[0] == 0 or w.shape[1] == 0:
            raise ValueError(f"DenseLayer weight must have non-zero dimensions, got shape {w.shape}")
        if b.shape != (w.shape[0],):
            raise ValueError(
                f"DenseLayer bias must have shape (out_features,) = ({w.shape[0]},), got {b.shape}"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"DenseLayer activation must be one of {_ACTIVATIONS}, got {self.activation!r}")

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


def check_chain(layers: Sequence[DenseLayer]) -> None:
    """Raise ValueError unless ``layers`` is non-empty and each layer feeds the next."""
    if len(layers) == 0:
        raise ValueError("an MLP needs at least one DenseLayer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, DenseLayer):
            raise ValueError(f"layer {i} is a {type(layer).__name__}, expected DenseLayer")
    for i, (prev, nxt) in enumerate(itertools.pairwise(layers)):
        if prev.out_features != nxt.in_features:
            raise ValueError(
                f"layer {i} outputs {prev.out_features} features but layer {i + 1} expects "
                f"{nxt.in_features} (weight shapes {prev.weight.shape} -> {nxt.weight.shape})"
            )


def check_io_names(input_name: str, output_name: str) -> None:
    """Raise ValueError unless a model's input and output names are distinct and non-empty."""
    if not input_name or not output_name or input_name == output_name:
        raise ValueError(
            f"input_name and output_name must be distinct non-empty strings, got {input_name!r} and "
            f"{output_name!r}"
        )


def mlp_forward(layers: Sequence[DenseLayer], x: np.ndarray) -> np.ndarray:
    """Numpy reference forward pass in float32; ``x`` has shape (batch, in_features)."""
    check_chain(layers)
    in_features = layers[0].in_features
    if x.ndim != 2 or x.shape[1] != in_features:
        raise ValueError(f"input must have shape (batch, {in_features}), got {x.shape}")
    h = x.astype(np.float32, copy=False)
    for layer in layers:
        h = h @ layer.weight.T + layer.bias
        if layer.activation == "relu":
            h = np.maximum(h, np.float32(0.0))
    return h
