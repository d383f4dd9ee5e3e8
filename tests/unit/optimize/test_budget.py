"""Per-layer sensitivity: what each layer alone loses to pruning, factoring and int8."""

from __future__ import annotations

import numpy as np
import pytest

from edgegen.modelkit.layers import DenseLayer
from edgegen.optimize import digits
from edgegen.optimize.budget import sensitivity
from edgegen.optimize.recipe import LowRank, Prune
from edgegen.optimize.train import fresh_mlp, train


@pytest.fixture(scope="module")
def trained() -> tuple[list[DenseLayer], digits.Split]:
    split = digits.load_split(seed=0)
    layers = fresh_mlp([64, 48, 48, 10], 0, digits.PIXEL_MAX)
    return train(layers, split.x_train, split.y_train, epochs=10), split


def test_changing_nothing_costs_nothing(trained: tuple[list[DenseLayer], digits.Split]) -> None:
    layers, split = trained
    rows = sensitivity(layers, split, Prune(kind="prune", amount=0.0), LowRank(kind="lowrank", energy=1.0))
    assert [r["shape"] for r in rows] == [[48, 64], [48, 48], [10, 48]]
    for row in rows:
        assert row.get("prune_drop", 0.0) == 0.0
        assert row["lowrank_drop"] == 0.0
        assert abs(row["int8_drop"]) < 2.0  # int8 of one layer of a trained MLP costs little


def test_harder_cuts_cost_more(trained: tuple[list[DenseLayer], digits.Split]) -> None:
    layers, split = trained
    mild = sensitivity(layers, split, Prune(kind="prune", amount=0.2), LowRank(kind="lowrank", rank=24))
    harsh = sensitivity(layers, split, Prune(kind="prune", amount=0.95), LowRank(kind="lowrank", rank=1))
    assert sum(r["prune_drop"] for r in harsh[:2]) > sum(r["prune_drop"] for r in mild[:2])
    assert sum(r["lowrank_drop"] for r in harsh) > sum(r.get("lowrank_drop", 0) for r in mild)
    assert np.isfinite([r["int8_drop"] for r in harsh]).all()


def test_unstructured_pruning_applies_to_every_layer(trained: tuple[list[DenseLayer], digits.Split]) -> None:
    layers, split = trained
    rows = sensitivity(layers, split, Prune(kind="prune", method="l1", amount=0.5), None)
    assert all("prune_drop" in r for r in rows)
