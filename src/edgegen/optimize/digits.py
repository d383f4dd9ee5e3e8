"""The `digits` task: the seed's MLPs on scikit-learn's bundled handwritten digits.

The data set (1,797 8x8 images, grey levels 0-16, 10 classes) and its split (stratified, seed 0) are
the ones the node's default model is trained on (edgegen.modelkit.digits), so every figure is
comparable across runs and with the served model.
The seed's networks are 784-wide for MNIST; here the input is the 64 pixels:

    teacher  64 -> 1200 -> 1200 -> 10
    student  64 ->  800 ->  800 -> 10    (the node's default model, `digits`)

Training sees pixels scaled to [0, 1]; the exported model folds that 1/16 into the first layer, so a
client sends the pixels exactly as `load_digits().data` holds them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from edgegen.modelkit.digits import PIXEL_MAX, STUDENT_HIDDEN, Split, load_split
from edgegen.modelkit.layers import DenseLayer

TEACHER_HIDDEN = 1200
__all__ = ["PIXEL_MAX", "STUDENT_HIDDEN", "TEACHER_HIDDEN", "Split", "load_split"]


class MLP(nn.Module):
    """The seed's three-layer perceptron; parameter names match its `fc1`..`fc3`."""

    def __init__(self, hidden: int, inputs: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) in [0, 1] -> (B, 10) logits
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)  # (a module's call is typed Any)
        return logits


def train(
    model: MLP, split: Split, *, epochs: int = 40, lr: float = 1e-3, batch_size: int = 64, seed: int = 0
) -> float:
    """Train with Adam and cross-entropy; return test accuracy."""
    torch.manual_seed(seed)
    x = torch.from_numpy(split.x_train / PIXEL_MAX)
    y = torch.from_numpy(split.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.split(torch.randperm(len(x), generator=generator), batch_size):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            torch.autograd.backward(loss)  # loss.backward(), which torch leaves unannotated
            optimizer.step()
    return accuracy(model, split)


@torch.no_grad()
def accuracy(model: MLP, split: Split) -> float:
    model.eval()
    logits = model(torch.from_numpy(split.x_test / PIXEL_MAX))
    return float((logits.argmax(1).numpy() == split.y_test).mean())


def to_layers(model: MLP) -> list[DenseLayer]:
    """The model as exportable layers taking raw 0-16 pixels (the 1/16 folded into fc1)."""
    linears = [model.fc1, model.fc2, model.fc3]
    layers = []
    for i, linear in enumerate(linears):
        weight = linear.weight.detach().numpy().astype(np.float32)
        if i == 0:
            weight = weight / np.float32(PIXEL_MAX)
        layers.append(
            DenseLayer(
                weight=np.ascontiguousarray(weight),
                bias=linear.bias.detach().numpy().astype(np.float32),
                activation="relu" if i < len(linears) - 1 else "none",
            )
        )
    return layers
