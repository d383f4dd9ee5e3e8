"""The optimization report as Markdown: one row per package, figures against the teacher."""

from __future__ import annotations

from typing import Any


def markdown(result: dict[str, Any]) -> str:
    if result["task"] == "lm":
        return _lm_markdown(result)
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
        *_seed_table(rows),
        *_tflite_table(rows),
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
    if "budget" in result:
        lines += _budget_markdown(result["budget"], result["baseline"]["accuracy"])
    return "\n".join(lines) + "\n"


# The seed's table of compression methods (§2), its claims in English, extended by the steps it describes
# in its text; the measured columns are each step against the model it started from.
SEED_CLAIMS: dict[str, tuple[str, str, str]] = {
    "distill": (
        "Knowledge distillation",
        "shrinks the model while keeping accuracy",
        "needs a large teacher first",
    ),
    "prune": ("Pruning", "cuts parameters and computation directly", "may lower accuracy"),
    "lowrank": ("Low-rank factorization", "fewer parameters and multiply-adds", "approximation error"),
    "share": ("Parameter sharing", "fewer distinct weights to store", "may lower accuracy"),
    "int8": ("Quantization", "much less storage and computation", "quantization error may lower accuracy"),
}


def _seed_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## The seed's comparison table, measured",
        "",
        "Each step against the model it started from (an int8 package against the float model it quantized).",
        "",
        "| method | the seed says: pro | the seed says: con | step | × smaller | × faster b1 | × faster b64 "
        "| Δ accuracy (points) |",
        "|---|---|---|---|--:|--:|--:|--:|",
    ]
    float_input = rows[0]
    for row in rows[1:]:
        kind = "int8" if row["step"].startswith("int8") else row["step"]
        if kind not in SEED_CLAIMS:
            continue  # the student trained alone is a control, not a method
        name, pro, con = SEED_CLAIMS[kind]
        lines.append(
            f"| {name} | {pro} | {con} | {row['package']} "
            f"| {float_input['size_bytes'] / row['size_bytes']:.2f} "
            f"| {float_input['latency_ms_p50'] / row['latency_ms_p50']:.2f} "
            f"| {float_input['latency_ms_p50_batch64'] / row['latency_ms_p50_batch64']:.2f} "
            f"| {100 * (row['accuracy'] - float_input['accuracy']):+.2f} |"
        )
        if kind != "int8":
            float_input = row
    return lines


def _tflite_table(rows: list[dict[str, Any]]) -> list[str]:
    lite = [r for r in rows if "tflite" in r]
    if not lite:
        return []
    lines = [
        "",
        "## TFLite packages (each float step through our TFLite writer, timed on LiteRT, one thread)",
        "",
        "| package | size KiB | p50 ms b1 (ONNX Runtime's) | p50 ms b64 (ONNX Runtime's) | accuracy "
        "| max abs err |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for row in lite:
        t = row["tflite"]
        lines.append(
            f"| {t['package']} | {t['size_bytes'] / 1024:,.1f} | {t['latency_ms_p50']:.4f} "
            f"({row['latency_ms_p50']:.4f}) | {t['latency_ms_p50_batch64']:.4f} "
            f"({row['latency_ms_p50_batch64']:.4f}) | {t['accuracy']:.4f} | {t['max_abs_error']:.2g} |"
        )
    return lines


def _budget_markdown(found: dict[str, Any], teacher_accuracy: float) -> list[str]:
    drop = found["max_accuracy_drop"]
    lines = [
        "",
        f"## Budget search: at most {drop} accuracy points below the teacher ({teacher_accuracy:.4f})",
        "",
        f"Per-layer sensitivity of the {found['sensitivity_of']} model: accuracy points lost when only that "
        "layer is pruned (the recipe's first prune step; for neurons, the layer's outputs), factored (its "
        "first lowrank step) or quantized to int8, with no fine-tuning.",
        "",
        "| layer | shape | prune | lowrank | int8 |",
        "|--:|---|--:|--:|--:|",
    ]
    for row in found["sensitivity"]:
        cells = [f"{row[k]:+.2f}" if k in row else "—" for k in ("prune_drop", "lowrank_drop", "int8_drop")]
        lines.append(f"| {row['layer']} | {row['shape'][0]}×{row['shape'][1]} | {' | '.join(cells)} |")
    within = sorted((c for c in found["candidates"] if c["within"]), key=lambda c: c["latency_ms_p50"])
    lines += [
        "",
        f"{len(found['candidates'])} combinations tried, {len(within)} within the budget (accuracy ≥ "
        f"{found['accuracy_floor']:.4f}); the fastest ten:",
        "",
        "| combination | accuracy | size KiB | p50 ms b1 | p50 ms b64 |",
        "|---|--:|--:|--:|--:|",
        *(
            f"| {c['candidate']} | {c['accuracy']:.4f} | {c['size_bytes'] / 1024:,.1f} "
            f"| {c['latency_ms_p50']:.4f} | {c['latency_ms_p50_batch64']:.4f} |"
            for c in within[:10]
        ),
        "",
        f"Chosen (package `budget`): **{found['chosen']['candidate']}**."
        if found["chosen"]
        else "No combination stays within the budget; no `budget` package was written.",
    ]
    return lines


def _lm_markdown(result: dict[str, Any]) -> str:
    machine, text, base = result["machine"], result["text"], result["baseline"]
    lines = [
        f"# Optimization report — task `lm` ({result['recipe']['base']})",
        "",
        f"Measured on this machine: llama-cpp-python {machine['llama_cpp_python']}, {machine['threads']} "
        f"threads, Python {machine['python']}. Perplexity: {text['scored_tokens']:,} tokens scored of the "
        f"{text['tokens']:,}-token held-out text ({text['source']}, {len(text['modules'])} modules), in "
        f"chunks of {result['recipe']['eval']['ctx']} tokens. Decode: ms per token of greedy decoding, one "
        "sequence, on the node's executor (median, min–max). Every delta is against the reference "
        f"`{base['package']}`, written from a base stored as {base['source_type']}"
        + (
            " — so the reference holds no more information than the base, and the base's own type scores as "
            "the reference does, up to activation rounding."
            if base["source_type"] != base["type"]
            else "."
        ),
        "",
        "| package | type | blocks | params | size MiB | × smaller | ms/token p50 (min–max) | tokens/s "
        "| × faster | perplexity | Δ perplexity |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in [base, *result["steps"]]:
        delta = row.get("perplexity_delta_pct")
        lines.append(
            f"| {row['package']} | {row['type']} | {row['n_layers']} | {row['params']:,} "
            f"| {row['size_bytes'] / 2**20:,.1f} | {row.get('size_ratio', 1.0)} "
            f"| {row['latency_ms_p50']:.2f} ({row['latency_ms_min']:.2f}–{row['latency_ms_max']:.2f}) "
            f"| {row['tokens_per_s']} | {row.get('speedup', 1.0)} | {row['perplexity']:.3f} "
            f"| {'—' if delta is None else f'{delta:+.2f} %'} |"
        )
    if result["sensitivity"]:
        lines += [
            "",
            "## Depth sensitivity (perplexity with one block dropped, the reference otherwise)",
            "",
            "| block | perplexity | Δ |",
            "|--:|--:|--:|",
            *(f"| {s['layer']} | {s['perplexity']:.3f} | {s['delta']:+.3f} |" for s in result["sensitivity"]),
        ]
    lines += [
        "",
        "![perplexity vs latency](perplexity_vs_latency.png)",
        "![perplexity vs size](perplexity_vs_size.png)",
    ]
    return "\n".join(lines) + "\n"
