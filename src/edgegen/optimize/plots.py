"""Plots of the report: quality against latency and against size, the Pareto front marked.

Quality is test accuracy (digits, higher is better) or perplexity (lm, lower is better). A package is
on the Pareto front when no other package is at least as good and at least as small/fast, and strictly
better in one of the two.
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
    """Write <quality>_vs_latency.png and <quality>_vs_size.png into `out`; return their paths."""
    rows = [result["baseline"], *result["steps"]]
    lm = result["task"] == "lm"
    quality, sign = ("perplexity", -1.0) if lm else ("accuracy", 1.0)
    latency = "llama.cpp decode p50 (ms per token" if lm else "ONNX Runtime p50 latency at batch 1 (ms"
    written = []
    for key, label, name in (
        ("latency_ms_p50", f"{latency}, log scale)", f"{quality}_vs_latency.png"),
        ("size_bytes", "model file size (bytes, log scale)", f"{quality}_vs_size.png"),
    ):
        points = [(float(r[key]), float(r[quality])) for r in rows]
        front = set(pareto([(cost, sign * value) for cost, value in points]))
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
        axes.set_ylabel("perplexity on held-out text (lower is better)" if lm else "test accuracy")
        axes.set_title(f"{result['task']}: {quality} vs {'latency' if 'latency' in key else 'size'}")
        axes.grid(alpha=0.3)
        axes.legend(loc="best")
        figure.tight_layout()
        path = out / name
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
