"""Plots of the report: accuracy against latency and against size, the Pareto front marked.

A package is on the Pareto front when no other package is at least as accurate and at least as
small/fast, and strictly better in one of the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

from matplotlib import pyplot as plt


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, accuracy) that no other point dominates (lower cost, higher accuracy).

    >>> pareto([(1.0, 0.9), (2.0, 0.95), (3.0, 0.93)])
    [0, 1]
    """
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            c <= cost and a >= accuracy and (c < cost or a > accuracy)
            for j, (c, a) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def plot(result: dict[str, Any], out: Path) -> list[Path]:
    """Write accuracy_vs_latency.png and accuracy_vs_size.png into `out`; return their paths."""
    rows = [result["baseline"], *result["steps"]]
    written = []
    for key, label, name in (
        ("latency_ms_p50", "ONNX Runtime p50 latency at batch 1 (ms, log scale)", "accuracy_vs_latency.png"),
        ("size_bytes", "model file size (bytes, log scale)", "accuracy_vs_size.png"),
    ):
        points = [(float(r[key]), float(r["accuracy"])) for r in rows]
        front = set(pareto(points))
        figure, axes = plt.subplots(figsize=(7, 4.5), dpi=110)
        for i, (row, (x, y)) in enumerate(zip(rows, points, strict=True)):
            axes.scatter(
                x, y, s=60 if i in front else 30, color="tab:red" if i in front else "tab:blue", zorder=3
            )
            axes.annotate(row["package"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ordered = sorted(points[i] for i in front)
        axes.plot(
            [p[0] for p in ordered], [p[1] for p in ordered], color="tab:red", lw=1, label="Pareto front"
        )
        axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.set_ylabel("test accuracy")
        axes.set_title(f"{result['task']}: accuracy vs {'latency' if 'latency' in key else 'size'}")
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
        figure.tight_layout()
        path = out / name
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
