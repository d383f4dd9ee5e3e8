"""deploy/prometheus/ as Prometheus' own tool reads it: `promtool check config` and `check rules` accept
it, and `promtool test rules` shows each alert firing when it should — not before its `for`, and not on
series that are fine. promtool comes with Debian's prometheus package (`make setup` installs it);
tests/e2e/test_prometheus.py runs the rules in a real Prometheus scraping a fleet."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy" / "prometheus"
NODE = 'instance="n1:8001",job="edgegen-node"'
GATEWAY = 'instance="gw:8080",job="edgegen-gateway"'


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is missing: `make setup` installs Debian's prometheus package")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


@dataclass(frozen=True)
class Case:
    """`alert` on `series` (promtool's notation: one value per `interval`): not firing at `quiet`, firing
    with `labels` at `fires`; `fires` None: never firing by `quiet`."""

    alert: str
    series: dict[str, str]
    quiet: str
    fires: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    interval: str = "15s"


def histogram(name: str, labels: str, below: float, above: float) -> dict[str, str]:
    """Buckets of a histogram whose observations (10 per sample) all fall between `below` and `above`."""
    return {
        f'{name}_bucket{{{labels},le="{below}"}}': "0+0x60",
        f'{name}_bucket{{{labels},le="{above}"}}': "0+10x60",
        f'{name}_bucket{{{labels},le="+Inf"}}': "0+10x60",
    }


def responses(name: str, labels: str, errors_per_sample: int) -> dict[str, str]:
    """100 good answers per sample and `errors_per_sample` 5xx."""
    return {
        f'{name}{{{labels},status="200"}}': "0+100x60",
        f'{name}{{{labels},status="503"}}': f"0+{errors_per_sample}x60",
    }


ON_NODE = {"instance": "n1:8001", "severity": "warning"}
CASES = [
    # Two failed scrapes in a row page; one (a slow answer) does not.
    Case("EdgegenNodeDown", {f"up{{{NODE}}}": "1 1 0 0 0"}, quiet="10s", fires="15s", interval="5s",
         labels={"instance": "n1:8001", "job": "edgegen-node", "severity": "critical"}),
    Case("EdgegenNodeDown", {f"up{{{NODE}}}": "1 1 0 1 1"}, quiet="20s", interval="5s"),
    Case("EdgegenGatewayDown", {f"up{{{GATEWAY}}}": "1 1 0 0 0"}, quiet="10s", fires="15s", interval="5s",
         labels={"instance": "gw:8080", "job": "edgegen-gateway", "severity": "critical"}),
    Case("EdgegenNodeErrorRate", responses("edgegen_responses_total", f'{NODE},route="/predict"', 10),
         quiet="5m", fires="6m", labels=ON_NODE),
    Case("EdgegenNodeErrorRate", responses("edgegen_responses_total", f'{NODE},route="/predict"', 1),
         quiet="10m"),
    Case("EdgegenGatewayErrorRate", responses("edgegen_gateway_responses_total", GATEWAY, 10),
         quiet="5m", fires="6m", labels={"instance": "gw:8080", "severity": "critical"}),
    Case("EdgegenSlowInference",
         histogram("edgegen_request_duration_seconds", f'{NODE},route="/predict",method="POST"', 1, 2.5),
         quiet="10m", fires="11m", labels=ON_NODE),
    # A long generation is slow on purpose: its first token is what counts.
    Case("EdgegenSlowInference",
         histogram("edgegen_request_duration_seconds", f'{NODE},route="/v1/chat/completions"', 1, 30),
         quiet="14m"),
    Case("EdgegenSlowFirstToken",
         histogram("edgegen_time_to_first_token_seconds", f'{NODE},model="tiny"', 5, 10),
         quiet="10m", fires="11m", labels=ON_NODE),
    # Waiting for cells: what the running sequences reserve and the next one needs is past the cache,
    # though the tokens held are not (max_tokens reserved, not yet written).
    Case("EdgegenKvCacheFull",
         {f'edgegen_kv_cache_wanted_ratio{{{NODE},model="tiny"}}': "1.3x60",
          f'edgegen_kv_cache_usage_ratio{{{NODE},model="tiny"}}': "0.4x60"},
         quiet="4m", fires="6m", labels=ON_NODE),
    # Cached prefixes fill the cache, and a generation waits for a slot, not for cells: not this alert.
    Case("EdgegenKvCacheFull",
         {f'edgegen_kv_cache_wanted_ratio{{{NODE},model="tiny"}}': "0.8x60",
          f'edgegen_kv_cache_usage_ratio{{{NODE},model="tiny"}}': "0.99x60",
          f'edgegen_sequences{{{NODE},model="tiny",state="waiting"}}': "3x60"},
         quiet="14m"),
    Case("EdgegenQueueFull",
         {f'edgegen_queue_depth{{{NODE},model="digits"}}': "900x20",
          f'edgegen_queue_capacity{{{NODE},model="digits"}}': "1024x20"},
         quiet="45s", fires="2m", labels={**ON_NODE, "model": "digits"}),
    Case("EdgegenQueueFull",
         {f'edgegen_queue_depth{{{NODE},model="digits"}}': "500x20",
          f'edgegen_queue_capacity{{{NODE},model="digits"}}': "1024x20"},
         quiet="4m"),
    Case("EdgegenDiskNearlyFull",
         {f'edgegen_system_disk_bytes{{{NODE},state="free"}}': "5x60",
          f'edgegen_system_disk_bytes{{{NODE},state="total"}}': "100x60"},
         quiet="9m", fires="11m", labels={**ON_NODE, "job": "edgegen-node"}),
    Case("EdgegenDiskNearlyFull",
         {f'edgegen_system_disk_bytes{{{NODE},state="free"}}': "30x60",
          f'edgegen_system_disk_bytes{{{NODE},state="total"}}': "100x60"},
         quiet="14m"),
]  # fmt: skip


def promtool_test(case: Case) -> dict[str, Any]:
    """`case` as one of promtool's unit tests."""
    checks: list[dict[str, Any]] = [{"eval_time": case.quiet, "alertname": case.alert, "exp_alerts": []}]
    if case.fires is not None:
        fired = {
            "eval_time": case.fires,
            "alertname": case.alert,
            "exp_alerts": [{"exp_labels": case.labels}],
        }
        checks.append(fired)
    return {
        "interval": case.interval,
        "input_series": [{"series": name, "values": values} for name, values in case.series.items()],
        "alert_rule_test": checks,
    }


def test_promtool_accepts_the_config_and_its_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "rules.yml")):
        checked = promtool(*args[:2], str(DEPLOY / args[2]))
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    rules = yaml.safe_load((DEPLOY / "rules.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {case.alert for case in CASES} == alerts  # every alert has a case
    # What an alert says is for people; promtool would compare it word for word. Here: when it fires.
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": config["global"]["evaluation_interval"],
        "tests": [promtool_test(case) for case in CASES],
    }
    (tmp_path / "tests.yml").write_text(json.dumps(tests))  # JSON is YAML
    tested = promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
