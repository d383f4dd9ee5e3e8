"""`make bench-optimize`: both example recipes end to end, timed, with the issue's targets checked.

    digits   edgegen optimize examples/digits.toml --max-accuracy-drop 1.0
    lm       edgegen optimize examples/smollm2.toml

Each runs as its own `edgegen optimize` process (what a user runs), into
bench/results/optimize-<UTC stamp>/<task>/. The script then reads both report.json files and checks:

* digits: some int8 package that went through distill → structured prune is ≥ 4× smaller and ≥ 2×
  faster than the teacher at batch 1 and at batch 64, within 1.0 accuracy point; and whether the
  distilled student beats the student trained alone (reported either way);
* lm: the table holds Q8_0, Q4_K_M, Q4_0 and Q4_1, and the whole run took under 20 minutes.

It prints a summary and writes it, with the machine and the commands, to summary.json beside the runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from servers import machine_facts

ROOT = Path(__file__).resolve().parent.parent
LLM_TYPES = ("Q8_0", "Q4_K_M", "Q4_0", "Q4_1")
LLM_MINUTES = 20


def optimize(recipe: str, out: Path, *options: str) -> tuple[dict[str, Any], float, list[str]]:
    command = [sys.executable, "-m", "edgegen", "optimize", recipe, "--out", str(out), *options]
    print("$", " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    return json.loads((out / "report.json").read_text()), seconds, command[1:]


def digits_targets(report: dict[str, Any]) -> dict[str, Any]:
    teacher = report["baseline"]
    best = None
    for step in report["steps"]:
        ok = (
            step["step"].startswith("int8")
            and step["size_ratio"] >= 4
            and step["speedup_batch1"] >= 2
            and step["speedup_batch64"] >= 2
            and step["accuracy"] >= teacher["accuracy"] - 0.01
        )
        if ok and (best is None or step["speedup_batch1"] > best["speedup_batch1"]):
            best = step
    alone = next(s for s in report["steps"] if s["step"] == "student-alone")
    distilled = next(s for s in report["steps"] if s["step"] == "distill")
    chosen = report.get("budget", {}).get("chosen")
    return {
        "package_met": best is not None,
        "package": None if best is None else {k: best[k] for k in (
            "package", "size_ratio", "speedup_batch1", "speedup_batch64", "accuracy_delta")},
        "distilled_accuracy": distilled["accuracy"],
        "alone_accuracy": alone["accuracy"],
        "distillation_wins": distilled["accuracy"] > alone["accuracy"],
        "budget_chosen": chosen,
    }  # fmt: skip


def lm_targets(report: dict[str, Any], seconds: float) -> dict[str, Any]:
    rows = [report["baseline"], *report["steps"]]
    types = {r["type"] for r in rows if r["step"] == "quantize"}
    return {
        "types_met": set(LLM_TYPES) <= types,
        "minutes": round(seconds / 60, 2),
        "time_met": seconds < LLM_MINUTES * 60,
        "table": [{k: r.get(k) for k in ("package", "type", "n_layers", "size_bytes", "tokens_per_s",
                                          "perplexity", "perplexity_delta_pct")} for r in rows],
    }  # fmt: skip


def main() -> None:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"optimize-{stamp}"
    out.mkdir(parents=True)
    summary: dict[str, Any] = {"date": stamp, "machine": machine_facts()}
    digits, digits_s, digits_cmd = optimize(
        "examples/digits.toml", out / "digits", "--max-accuracy-drop", "1.0"
    )
    summary["digits"] = {
        "command": " ".join(digits_cmd),
        "seconds": round(digits_s, 1),
        **digits_targets(digits),
    }
    lm, lm_s, lm_cmd = optimize("examples/smollm2.toml", out / "smollm2")
    summary["lm"] = {"command": " ".join(lm_cmd), "seconds": round(lm_s, 1), **lm_targets(lm, lm_s)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    d, m = summary["digits"], summary["lm"]
    verdict = f"met by {json.dumps(d['package'])}" if d["package_met"] else "MISSED"
    print(f"\ndigits ({d['seconds']} s): target package {verdict}")
    print(
        f"  distilled student {d['distilled_accuracy']:.4f} vs alone {d['alone_accuracy']:.4f}: "
        f"distillation {'wins' if d['distillation_wins'] else 'does not win'}"
    )
    if d["budget_chosen"]:
        print(f"  budget 1.0 point: {d['budget_chosen']['candidate']}")
    print(
        f"lm ({m['minutes']} min, target < {LLM_MINUTES}: {'met' if m['time_met'] else 'MISSED'}; "
        f"types {'met' if m['types_met'] else 'MISSED'})"
    )
    for row in m["table"]:
        print(
            f"  {row['package']:<18} {row['type']:<7} {row['size_bytes'] / 2**20:7.1f} MiB "
            f"{row['tokens_per_s']:7.1f} tok/s  ppl {row['perplexity']:.3f}"
        )
    print(f"\nreports under {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
