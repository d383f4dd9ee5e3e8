"""Training a dense MLP given as `DenseLayer`s: plain cross-entropy, or knowledge distillation.

Distillation follows Hinton et al. (2015), as the seed writes it: the student matches the teacher's
softened distribution (KL at temperature T, scaled by T²) mixed with cross-entropy on the labels,
`loss = (1 - alpha) * CE + alpha * T² * KL(student_T || teacher_T)`.

Models take raw pixels (0-16); training scales nothing itself, the first layer folds it (see digits.py).

Quantization-aware training (`fake_quant=True`) trains through the rounding that int8 inference will
apply, with ONNX Runtime's static QDQ scheme (quantize.py): weights per tensor, symmetric, ±127;
activations (every Linear's input and output) per tensor, asymmetric int8, their ranges tracked as the
running min/max of the batches. Rounding passes gradients straight through (inside the range).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgegen.modelkit.layers import DenseLayer


class _Range(nn.Module):
    """Fake-quantizes a tensor to asymmetric int8 over the running min/max of what it has seen."""

    low: torch.Tensor  # buffers, registered in __init__
    high: torch.Tensor

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("low", torch.tensor(float("nan")))
        self.register_buffer("high", torch.tensor(float("nan")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                low, high = x.min().clamp(max=0.0), x.max().clamp(min=0.0)  # zero stays exact
                if torch.isnan(self.low):
                    self.low.copy_(low)
                    self.high.copy_(high)
                else:
                    self.low.lerp_(low, self.momentum)
                    self.high.lerp_(high, self.momentum)
        scale = float((self.high - self.low).clamp(min=1e-8)) / 255
        zero_point = round(-128 - float(self.low) / scale)
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)


class QatLinear(nn.Linear):
    """A Linear that computes with int8-rounded weights and activations (straight-through gradients)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.inputs, self.outputs = _Range(), _Range()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.weight.detach().abs().max().clamp(min=1e-8)) / 127
        weight = torch.fake_quantize_per_tensor_affine(self.weight, scale, 0, -127, 127)
        # (annotated: a module's call is typed Any)
        out: torch.Tensor = self.outputs(F.linear(self.inputs(x), weight, self.bias))
        return out


def to_torch(layers: Sequence[DenseLayer], *, fake_quant: bool = False) -> nn.Sequential:
    """Layers holding the same weight array (tied) get the same Parameter, so they train as one."""
    modules: list[nn.Module] = []
    weights: dict[int, torch.Tensor] = {}
    for layer in layers:
        kind = QatLinear if fake_quant else nn.Linear
        linear = kind(layer.in_features, layer.out_features)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(layer.weight))
            linear.bias.copy_(torch.from_numpy(layer.bias))
        linear.weight = weights.setdefault(id(layer.weight), linear.weight)
        modules.append(linear)
        if layer.activation == "relu":
            modules.append(nn.ReLU())
    return nn.Sequential(*modules)


def from_torch(model: nn.Sequential) -> list[DenseLayer]:
    """A Parameter used by several Linears (tied) comes back as one array those layers share."""
    layers: list[DenseLayer] = []
    modules = list(model)
    arrays: dict[int, np.ndarray] = {}
    for i, module in enumerate(modules):
        if isinstance(module, nn.Linear):
            relu = i + 1 < len(modules) and isinstance(modules[i + 1], nn.ReLU)
            weight = arrays.setdefault(
                id(module.weight), module.weight.detach().numpy().astype(np.float32).copy()
            )
            layers.append(
                DenseLayer(
                    weight,
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
    fake_quant: bool = False,
) -> list[DenseLayer]:
    """Train and return new layers. With `teacher`, distil; with `keep_zeros`, pruned weights stay zero;
    with `fake_quant`, train through int8 rounding (the float weights returned are ready for it)."""
    torch.manual_seed(seed)
    model = to_torch(layers, fake_quant=fake_quant)
    masks = [m.weight.detach() != 0 for m in model if isinstance(m, nn.Linear)] if keep_zeros else []
    teacher_model = to_torch(teacher).eval() if teacher is not None else None
    xs, ys = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(xs), generator=generator), batch_size):
            logits = model(xs[idx])
            loss = F.cross_entropy(logits, ys[idx])
            if teacher_model is not None:
                with torch.no_grad():
                    soft = F.softmax(teacher_model(xs[idx]) / temperature, dim=1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
                loss = (1 - alpha) * loss + alpha * kd * temperature**2
            optimizer.zero_grad()
            torch.autograd.backward(loss)  # loss.backward(), which torch leaves unannotated
            optimizer.step()
            if masks:
                with torch.no_grad():
                    for linear, mask in zip(
                        (m for m in model if isinstance(m, nn.Linear)), masks, strict=True
                    ):
                        linear.weight.mul_(mask)
    return from_torch(model.eval())
