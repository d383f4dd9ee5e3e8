"""Figures, targets and tables (rich and Markdown) for bench/llm.py."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

Summary = dict[tuple[str, int], dict[str, Any]]  # (system, streams) -> figures over all rounds and waves
SYSTEMS = ("edgegen", "llama-cpp-server", "ceiling", "floor")
COLUMNS = (
    "system",
    "streams",
    "TTFT p50 ms",
    "TTFT p99 ms",
    "decode tok/s/stream",
    "aggregate tok/s",
    "min–max",
    "ITL p99 ms",
    "tokens/req",
    "cached/req",
    "requests",
)


def summarize(rows: list[dict[str, Any]]) -> Summary:
    """TTFT percentiles over all requests; decode tok/s median over all streams; aggregate over waves."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["streams"]), []).append(row)
    summary: Summary = {}
    for key, group in groups.items():
        ttft = [t for r in group for t in r["ttft_s"]]
        gaps = [g for r in group for g in r["gaps_s"]]
        tokens = [t for r in group for t in r["tokens"]]
        aggregate = [r["aggregate_tps"] for r in group]
        cached = [c for r in group for c in r.get("cached_tokens", []) if c is not None]
        summary[key] = {
            "waves": len(group),
            "requests": len(ttft),
            "ttft_p50_ms": float(np.percentile(ttft, 50)) * 1000,
            "ttft_p99_ms": float(np.percentile(ttft, 99)) * 1000,
            "decode_tps": statistics.median(d for r in group for d in r["decode_tps"]),
            "aggregate_tps": statistics.median(aggregate),
            "aggregate_min": min(aggregate),
            "aggregate_max": max(aggregate),
            "itl_p99_ms": float(np.percentile(gaps, 99)) * 1000 if gaps else None,
            "tokens_min": min(tokens),
            "tokens_max": max(tokens),
            "cached_mean": statistics.mean(cached) if cached else None,
            "ended_early": sum(f != "length" for r in group for f in r["finish"]),
            "eos_in_window": sum(e is not None for r in group for e in r.get("eos_at", [])),
        }
    return summary


def ordered(summary: Summary) -> list[tuple[str, int]]:
    levels = sorted({n for _, n in summary})
    return [(s, n) for n in levels for s in SYSTEMS if (s, n) in summary]


def _check(target: str, value: float | None, limit: float | None, unit: str, higher: bool) -> dict[str, Any]:
    met = value is not None and limit is not None and (value >= limit if higher else value <= limit)
    return {"target": target, "value": value, "limit": limit, "unit": unit, "met": met}


def targets(summary: Summary, prefix_pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for edgegen. TTFT at 1 stream compares medians (p50)."""
    ours1, floor1 = summary.get(("edgegen", 1)), summary.get(("floor", 1))
    ours8, ceiling8 = summary.get(("edgegen", 8)), summary.get(("ceiling", 8))
    checks = []
    if ours1 and floor1:
        checks.append(
            _check(
                "1 stream: decode tok/s ≥ 0.9× floor",
                ours1["decode_tps"],
                0.9 * floor1["decode_tps"],
                "tok/s",
                higher=True,
            )
        )
        checks.append(
            _check(
                "1 stream: TTFT p50 ≤ 1.1× floor + 5 ms",
                ours1["ttft_p50_ms"],
                1.1 * floor1["ttft_p50_ms"] + 5,
                "ms",
                higher=False,
            )
        )
    if ours8 and ceiling8:
        checks.append(
            _check(
                "8 streams: aggregate ≥ 85% of ceiling",
                ours8["aggregate_tps"],
                0.85 * ceiling8["aggregate_tps"],
                "tok/s",
                higher=True,
            )
        )
    if ours8:
        checks.append(_check("8 streams: TTFT p99 ≤ 2 s", ours8["ttft_p99_ms"], 2000.0, "ms", higher=False))
    if prefix_pairs:
        ratio = statistics.median(p["ratio"] for p in prefix_pairs)
        checks.append(_check("prefix cache: TTFT warm ≤ 0.3× cold", ratio, 0.3, "×", higher=False))
    return checks


def ratio_rows(summary: Summary) -> list[dict[str, Any]]:
    rows = []
    for n in sorted({n for _, n in summary}):
        ours, theirs, ceiling = (summary.get((s, n)) for s in ("edgegen", "llama-cpp-server", "ceiling"))
        if not ours:
            continue
        row: dict[str, Any] = {"streams": n}
        if ceiling:
            row["ours_vs_ceiling"] = ours["aggregate_tps"] / ceiling["aggregate_tps"]
        if theirs:
            row["ours_vs_theirs"] = ours["aggregate_tps"] / theirs["aggregate_tps"]
            row["ttft_ours_vs_theirs"] = ours["ttft_p50_ms"] / theirs["ttft_p50_ms"]
        if theirs and ceiling:
            row["theirs_vs_ceiling"] = theirs["aggregate_tps"] / ceiling["aggregate_tps"]
        rows.append(row)
    return rows


def bound(result: dict[str, Any], summary: Summary) -> dict[str, Any]:
    """Bandwidth ÷ bytes per token, and where each 1-stream decode rate stands against it."""
    gbps = result["bandwidth"]["gb_per_s"]
    tps = gbps * 1e9 / result["tensor_bytes"]
    at = {s: summary[(s, 1)]["decode_tps"] / tps for s in SYSTEMS if (s, 1) in summary}
    return {
        "bandwidth_gb_per_s": gbps,
        "tensor_mb": result["tensor_bytes"] / 1e6,
        "bound_tps": tps,
        "share": at,
    }


# --- formatting ---------------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _cells(system: str, n: int, s: dict[str, Any]) -> list[str]:
    tokens = (
        str(s["tokens_min"]) if s["tokens_min"] == s["tokens_max"] else f"{s['tokens_min']}–{s['tokens_max']}"
    )
    return [
        system,
        str(n),
        _f(s["ttft_p50_ms"]),
        _f(s["ttft_p99_ms"]),
        _f(s["decode_tps"]),
        _f(s["aggregate_tps"]),
        f"{_f(s['aggregate_min'])}–{_f(s['aggregate_max'])}",
        _f(s["itl_p99_ms"]),
        tokens,
        _f(s["cached_mean"]),
        str(s["requests"]),
    ]


def _value(check: dict[str, Any]) -> tuple[str, str]:
    digits = 2 if check["unit"] == "×" else 1
    unit = "" if check["unit"] == "×" else f" {check['unit']}"
    return _f(check["value"], digits) + unit, _f(check["limit"], digits) + unit


def _memory_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, server in result["servers"].items():
        idle, after = server["memory_idle"], server["memory_after"]
        rows.append(
            [
                name,
                f"{server['startup_s']:.2f} s",
                f"{idle['rss'] / 2**20:.1f} MiB",
                f"{idle['pss'] / 2**20:.1f} MiB",
                f"{after['rss'] / 2**20:.1f} MiB",
                str(after["processes"]),
            ]
        )
    return rows


MEMORY_COLUMNS = ("server", "start → ready", "RSS loaded", "PSS loaded", "RSS after the run", "processes")
PREFIX_COLUMNS = ("server", "pairs", "cold TTFT ms", "warm TTFT ms", "warm ÷ cold", "cached tokens (warm)")


def _prefix_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, pairs in result["prefix_cache"].items():
        if not pairs:
            continue
        cached = {p["warm_cached_tokens"] for p in pairs}
        rows.append(
            [
                name,
                str(len(pairs)),
                _f(statistics.median(p["cold_ttft_s"] for p in pairs) * 1000),
                _f(statistics.median(p["warm_ttft_s"] for p in pairs) * 1000),
                _f(statistics.median(p["ratio"] for p in pairs), 2),
                "—" if cached == {None} else ", ".join(str(c) for c in sorted(cached, key=str)),
            ]
        )
    return rows


def print_report(
    console: Console, summary: Summary, checks: list[dict[str, Any]], result: dict[str, Any]
) -> None:
    table = Table(
        title="LLM generation (TTFT over all requests; decode median over streams; aggregate over waves)"
    )
    for column in COLUMNS:
        table.add_column(column, justify="left" if column == "system" else "right")
    last = None
    for system, n in ordered(summary):
        if last is not None and n != last:
            table.add_section()
        table.add_row(*_cells(system, n, summary[(system, n)]))
        last = n
    console.print(table)
    for row in ratio_rows(summary):
        console.print(
            f"{row['streams']} streams: edgegen aggregate ÷ ceiling {_f(row.get('ours_vs_ceiling'), 2)}, "
            f"÷ llama-cpp-server {_f(row.get('ours_vs_theirs'), 2)}; TTFT p50 ÷ llama-cpp-server "
            f"{_f(row.get('ttft_ours_vs_theirs'), 2)}; "
            f"llama-cpp-server ÷ ceiling {_f(row.get('theirs_vs_ceiling'), 2)}"
        )
    for check in checks:
        value, limit = _value(check)
        mark = "[green]met[/]" if check["met"] else "[red]MISSED[/]"
        console.print(f"{check['target']:<42} {value:>12}  (limit {limit})  {mark}")
    for title, columns, rows in (
        ("start-up and memory", MEMORY_COLUMNS, _memory_rows(result)),
        ("prefix cache", PREFIX_COLUMNS, _prefix_rows(result)),
    ):
        side = Table(title=title)
        for column in columns:
            side.add_column(column, justify="left" if column == "server" else "right")
        for row in rows:
            side.add_row(*row)
        console.print(side)
    b = bound(result, summary)
    console.print(
        f"bandwidth bound, 1 stream: {b['bandwidth_gb_per_s']:.1f} GB/s ÷ {b['tensor_mb']:.1f} MB/token = "
        f"{b['bound_tps']:.0f} tok/s; {_decode_share(b)}"
    )
    console.print(_run_note(result))


def _decode_share(b: dict[str, Any]) -> str:
    """Where 1-stream decode stands against the bound (a run without 1 stream has no such figure)."""
    if not b["share"]:
        return "no 1-stream run to set against it"
    shares = ", ".join(f"{k} {v:.0%}" for k, v in b["share"].items())
    return f"1-stream decode stands at {shares} of it"


def _run_note(result: dict[str, Any]) -> str:
    cpu = result["cpu_during_run"]
    note = f"CPU over the run: {cpu['idle']:.0%} idle, {cpu['steal']:.1%} stolen by the hypervisor."
    if result["edgegen_log_observer_errors"]:
        note += (
            f" edgegen logged {result['edgegen_log_observer_errors']:,} 'generation observer failed' errors."
        )
    return note


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "--:" for i in range(len(columns))) + "|",
    ]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(summary: Summary, checks: list[dict[str, Any]], result: dict[str, Any]) -> str:
    lines = _md_table(COLUMNS, [_cells(s, n, summary[(s, n)]) for s, n in ordered(summary)])
    lines.append("")
    ratio_columns = (
        "streams",
        "edgegen ÷ ceiling",
        "edgegen ÷ llama-cpp-server",
        "TTFT p50 edgegen ÷ llama-cpp-server",
        "llama-cpp-server ÷ ceiling",
    )
    keys = ("ours_vs_ceiling", "ours_vs_theirs", "ttft_ours_vs_theirs", "theirs_vs_ceiling")
    ratio_table = [[str(r["streams"]), *(_f(r.get(k), 2) for k in keys)] for r in ratio_rows(summary)]
    lines += _md_table(ratio_columns, ratio_table)
    lines.append("")
    target_rows = [[c["target"], *_value(c), "yes" if c["met"] else "**no**"] for c in checks]
    lines += _md_table(("target (edgegen)", "value", "limit", "met"), target_rows)
    lines.append("")
    lines += _md_table(PREFIX_COLUMNS, _prefix_rows(result))
    lines.append("")
    lines += _md_table(MEMORY_COLUMNS, _memory_rows(result))
    b = bound(result, summary)
    lines += [
        "",
        f"Bandwidth bound, 1 stream: {b['bandwidth_gb_per_s']:.1f} GB/s (single-threaded numpy copy of "
        f"512 MiB, read + write, median of {result['bandwidth']['runs']}) ÷ {b['tensor_mb']:.1f} MB of GGUF "
        f"tensors per token = **{b['bound_tps']:.0f} tok/s**; {_decode_share(b)}.",
        "",
        _run_note(result),
    ]
    return "\n".join(lines)
