"""Training a dense MLP given as `DenseLayer`s: plain cross-entropy, or knowledge distillation.

Distillation follows Hinton et al. (2015), as the seed writes it: the student matches the teacher's
softened distribution (KL at temperature T, scaled by T²) mixed with cross-entropy on the labels,
`loss = (1 - alpha) * CE + alpha * T² * KL(student_T || teacher_T)`.

Models take raw pixels (0-16); training scales nothing itself, the first layer folds it (see digits.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgegen.optimize.layers import DenseLayer


def to_torch(layers: Sequence[DenseLayer]) -> nn.Sequential:
    modules: list[nn.Module] = []
    for layer in layers:
        linear = nn.Linear(layer.in_features, layer.out_features)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer.weight))
            linear.bias.copy_(torch.from_numpy(layer.bias))
        modules.append(linear)
        if layer.activation == "relu":
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def from_torch(model: nn.Sequential) -> list[DenseLayer]:
    layers: list[DenseLayer] = []
    modules = list(model)
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            layers.append(
                DenseLayer(
                    module.weight.detach().numpy().astype(np.float32).copy(),
                    module.bias.detach().numpy().astype(np.float32).copy(),
                    "relu" if relu else "none",
                )
            )
    return layers


def fresh_mlp(sizes: Sequence[int], seed: int, input_scale: float) -> list[DenseLayer]:
    """A newly initialised MLP (PyTorch's default init) whose first layer expects raw inputs / input_scale."""
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        modules.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            modules.append(nn.ReLU())
    layers = from_torch(nn.Sequential(*modules))
    first = layers[0]
    layers[0] = DenseLayer(
        (first.weight / np.float32(input_scale)).astype(np.float32), first.bias, first.activation
    )
    return layers


def train(
    layers: Sequence[DenseLayer],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    teacher: Sequence[DenseLayer] | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    keep_zeros: bool = False,
) -> list[DenseLayer]:
    """Train and return new layers. With `teacher`, distil; with `keep_zeros`, pruned weights stay zero."""
    torch.manual_seed(seed)
    model = to_torch(layers)
    masks = [m.weight.detach() != 0 for m in model if isinstance(m, nn.Linear)] if keep_zeros else []
    teacher_model = to_torch(teacher).eval() if teacher is not None else None
    xs, ys = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=generator).split(batch_size):
            logits = model(xs[idx])
            loss = F.cross_entropy(logits, ys[idx])
            if teacher_model is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher_model(xs[idx]) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
                loss = (1 - alpha) * loss + alpha * kd * temperature**2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for linear, mask in zip(
                        (m for m in model if isinstance(m, nn.Linear)), masks, strict=True
                    ):
                        linear.weight.mul_(mask)
    return from_torch(model.eval())
