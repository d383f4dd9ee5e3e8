"""The optimization report as Markdown: one row per package, figures against the teacher."""

from __future__ import annotations

from typing import Any


def markdown(result: dict[str, Any]) -> str:
    rows = [result["baseline"], *result["steps"]]
    lines = [
        f"# Optimization report — task `{result['task']}`",
        "",
        f"Measured on this machine: ONNX Runtime {result['machine']['onnxruntime']}, one intra-op thread; "
        "latency is the median of the recipe's runs. *max abs err*: the exported model's logits against "
        "the float layers it came from, on the test set (export parity; for int8, the quantization error).",
        "",
        "| package | params (non-zero) | size KiB | zlib KiB | × smaller | p50 ms b1 | × faster b1 "
        "| p50 ms b64 | × faster b64 | accuracy | Δ vs teacher | max abs err |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        params = f"{row.get('params', 0):,} ({row.get('nonzero_params', 0):,})"
        lines.append(
            f"| {row['package']} | {params} | {row['size_bytes'] / 1024:,.1f} "
            f"| {row['compressed_bytes'] / 1024:,.1f} | {row['size_ratio']} "
            f"| {row['latency_ms_p50']:.3f} | {row['speedup_batch1']} | {row['latency_ms_p50_batch64']:.3f} "
            f"| {row['speedup_batch64']} | {row['accuracy']:.4f} | {row['accuracy_delta']:+.4f} "
            f"| {row['max_abs_error']:.2g} |"
        )
    alone = next((r for r in rows if r["step"] == "student-alone"), None)
    distilled = next((r for r in rows if r["step"] == "distill"), None)
    if alone and distilled:
        verdict = "beats" if distilled["accuracy"] > alone["accuracy"] else "does not beat"
        lines += [
            "",
            f"Distillation (Hinton et al., 2015): the distilled student ({distilled['accuracy']:.4f}) "
            f"{verdict} the same student trained alone ({alone['accuracy']:.4f}) with the same epochs.",
        ]
    lines += [
        "",
        "![accuracy vs latency](accuracy_vs_latency.png)",
        "![accuracy vs size](accuracy_vs_size.png)",
    ]
    working = [e for e in result.get("engines", []) if e["status"] == "ok"]
    if result.get("engines"):
        lines += [
            "",
            "## Engines (the final float model, one thread)",
            "",
            "| engine | p50 ms batch 1 | p50 ms batch 64 | max abs error | status |",
            "|---|--:|--:|--:|---|",
        ]
        for e in result["engines"]:
            b1, b64 = e.get("latency_ms_p50"), e.get("latency_ms_p50_batch64")
            lines.append(
                f"| {e['engine']} | {b1 if b1 is not None else '—'} | {b64 if b64 is not None else '—'} "
                f"| {e.get('max_abs_error', '—')} | {e['status']} |"
            )
        if working:
            fastest_1 = min(working, key=lambda e: e["latency_ms_p50"])["engine"]
            fastest_64 = min(working, key=lambda e: e["latency_ms_p50_batch64"])["engine"]
            lines += ["", f"Fastest here: **{fastest_1}** at batch 1, **{fastest_64}** at batch 64."]
    return "\n".join(lines) + "\n"
