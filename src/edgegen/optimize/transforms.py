"""Compression transforms on a dense MLP (a list of `DenseLayer`), pure numpy, each reporting its error.

    prune_unstructured  zero the smallest weights (L1 magnitude or random), per layer or over all layers
    prune_neurons       remove whole hidden neurons by importance and shrink the layers around them
    low_rank            replace a weight matrix by two thinner ones from its truncated SVD
    share_weights       parameter sharing: each layer's weights take one of k shared values (k-means)
    tie_layers          parameter sharing across layers: layers of one shape use one weight matrix

Structured pruning makes the matrices smaller, so latency falls with it; unstructured pruning only
makes them sparse, which a dense runtime does not turn into speed (the report shows both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from edgegen.modelkit.layers import DenseLayer


@dataclass(frozen=True)
class Transformed:
    layers: list[DenseLayer]
    detail: dict[str, object]  # what was done, per layer: kept shapes, ranks, energy, sparsity


def prune_unstructured(
    layers: Sequence[DenseLayer],
    amount: float,
    *,
    method: Literal["l1", "random"] = "l1",
    scope: Literal["layer", "global"] = "layer",
    seed: int = 0,
) -> Transformed:
    """Zero `amount` of the weights (biases kept): the smallest by |w|, or chosen at random."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    rng = np.random.default_rng(seed)
    scores = [np.abs(layer.weight) if method == "l1" else rng.random(layer.weight.shape) for layer in layers]
    if scope == "global":
        threshold = np.quantile(np.concatenate([s.ravel() for s in scores]), amount) if amount else -np.inf
        masks = [s > threshold for s in scores]
    else:
        masks = [s > np.quantile(s, amount) if amount else np.ones_like(s, bool) for s in scores]
    out = [
        replace(layer, weight=(layer.weight * m).astype(np.float32))
        for layer, m in zip(layers, masks, strict=True)
    ]
    sparsity = [round(float(1 - m.mean()), 4) for m in masks]
    return Transformed(out, {"sparsity": sparsity, "method": method, "scope": scope})


def prune_neurons(layers: Sequence[DenseLayer], amount: float) -> Transformed:
    """Remove `amount` of each hidden layer's neurons, least important first, and shrink the layers.

    A hidden neuron's importance is the L1 norm of its outgoing weights times the L1 norm of its
    incoming ones: a neuron that receives little or sends little changes the output little.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"prune amount must be in [0, 1), got {amount}")
    out = list(layers)
    kept_sizes = []
    for i in range(len(out) - 1):
        layer, following = out[i], out[i + 1]
        importance = np.abs(layer.weight).sum(1) * np.abs(following.weight).sum(0)  # (hidden,)
        keep_n = max(1, round(layer.out_features * (1 - amount)))
        keep = np.sort(np.argsort(-importance, kind="stable")[:keep_n])
        out[i] = replace(layer, weight=np.ascontiguousarray(layer.weight[keep]), bias=layer.bias[keep].copy())
        out[i + 1] = replace(following, weight=np.ascontiguousarray(following.weight[:, keep]))
        kept_sizes.append(int(keep_n))
    return Transformed(out, {"hidden_sizes": kept_sizes})


def low_rank(
    layers: Sequence[DenseLayer], *, rank: int | None = None, energy: float | None = None
) -> Transformed:
    """Factor each weight W (out, in) ≈ B @ A with A (r, in), B (out, r) from its truncated SVD.

    The rank is given, or the smallest that keeps `energy` of the squared singular values. A layer is
    factored only where it saves parameters (r * (in + out) < in * out); A has no activation.
    """
    if (rank is None) == (energy is None):
        raise ValueError("low_rank takes exactly one of rank or energy")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    out: list[DenseLayer] = []
    ranks: list[int | None] = []
    errors: list[float] = []
    for layer in layers:
        u, s, vt = np.linalg.svd(layer.weight.astype(np.float64), full_matrices=False)
        if rank is not None:
            if rank > len(s):
                raise ValueError(
                    f"rank {rank} exceeds the smaller side ({len(s)}) of a {layer.weight.shape} matrix"
                )
            r = rank
        else:
            assert energy is not None
            r = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), energy - 1e-12) + 1)
        if r * (layer.in_features + layer.out_features) >= layer.in_features * layer.out_features:
            out.append(layer)
            ranks.append(None)
            errors.append(0.0)
            continue
        a = (np.sqrt(s[:r])[:, None] * vt[:r]).astype(np.float32)  # (r, in)
        b = (u[:, :r] * np.sqrt(s[:r])).astype(np.float32)  # (out, r)
        out.append(DenseLayer(a, np.zeros(r, np.float32), "none"))
        out.append(DenseLayer(b, layer.bias.copy(), layer.activation))
        ranks.append(r)
        errors.append(float(np.linalg.norm(layer.weight - b @ a) / np.linalg.norm(layer.weight)))
    return Transformed(out, {"ranks": ranks, "relative_error": [round(e, 5) for e in errors]})


def share_weights(layers: Sequence[DenseLayer], clusters: int, *, iterations: int = 20) -> Transformed:
    """Cluster each layer's weights to `clusters` shared values (1-D k-means, quantile start).

    The matrices keep their shape: a dense runtime gains no speed, but the weights become a codebook
    plus small indices, which compresses (the report shows the model file's zlib size).
    """
    if not 2 <= clusters <= 65536:
        raise ValueError(f"clusters must be in [2, 65536], got {clusters}")
    out: list[DenseLayer] = []
    errors: list[float] = []
    for layer in layers:
        w = layer.weight.ravel().astype(np.float64)
        centroids = np.quantile(w, (np.arange(clusters) + 0.5) / clusters)
        for _ in range(iterations):
            # Points sit between consecutive centroids' midpoints: assignment is a sorted search.
            assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, w)
            sums = np.bincount(assign, weights=w, minlength=clusters)
            counts = np.bincount(assign, minlength=clusters)
            centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
            centroids.sort()
        assign = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, w)
        shared = centroids[assign].astype(np.float32).reshape(layer.weight.shape)
        out.append(replace(layer, weight=shared))
        errors.append(float(np.linalg.norm(layer.weight - shared) / np.linalg.norm(layer.weight)))
    return Transformed(out, {"clusters": clusters, "relative_error": [round(e, 5) for e in errors]})


def tie_layers(layers: Sequence[DenseLayer]) -> Transformed:
    """Give every group of same-shaped weight matrices one shared matrix (the group's mean), as ALBERT
    ties its transformer layers. Tied layers hold the *same* array: the exporters write it once and
    training keeps it one parameter. Biases stay per layer.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(layer.weight.shape, []).append(i)
    tied = [group for group in groups.values() if len(group) > 1]
    if not tied:
        shapes = ", ".join(f"{w}x{h}" for w, h in groups)
        raise ValueError(f"no two layers have the same shape to tie (shapes {shapes})")
    out = list(layers)
    errors: dict[int, float] = {}
    for group in tied:
        shared = np.mean([layers[i].weight for i in group], axis=0).astype(np.float32)
        for i in group:
            out[i] = replace(layers[i], weight=shared)
            errors[i] = float(np.linalg.norm(layers[i].weight - shared) / np.linalg.norm(layers[i].weight))
    return Transformed(
        out, {"tied": tied, "relative_error": {str(i): round(e, 5) for i, e in sorted(errors.items())}}
    )
