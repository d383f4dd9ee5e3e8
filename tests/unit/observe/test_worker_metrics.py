"""A node's metrics with several worker processes (prometheus_client's multiprocess mode, one directory):
what the queue-wide and per-process job gauges show once the workers' readings differ."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Two workers of one node (two process ids, one directory), as `edgegen serve --workers 2` runs them: the
# first answers a scrape during a backlog, both run jobs; then the queue drains, the second answers a
# scrape and both finish their jobs.
SCRIPT = """
import json, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
import prometheus_client.values as values
pid = [1001]
values.ValueClass = values.MultiProcessValue(lambda: pid[0])
from edgegen.observe.metrics import NodeMetrics
first = NodeMetrics()
pid[0] = 1002
second = NodeMetrics()
pid[0] = 1001
first.on_jobs({"queued": 100, "running": 2})
first.on_busy(1)
pid[0] = 1002
second.on_busy(1)
second.on_jobs({"queued": 0, "running": 0})
second.on_busy(0)
pid[0] = 1001
first.on_busy(0)
pid[0] = 1002
lines = second.render().decode().splitlines()
print(json.dumps([l for l in lines if l.startswith(("edgegen_jobs{", "edgegen_job_workers_busy "))]))
"""


def test_with_workers_the_job_gauges_say_the_latest_reading_not_a_stale_one(tmp_path: Path) -> None:
    """Before, the queue's counts were combined as the largest any worker ever read (`queued 100` after
    the queue drained), and each worker's busy count was set only when that worker answered a scrape: a
    Prometheus on one kept-alive connection read a backlog that was gone, for as long as it scraped."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, check=True, timeout=60
    )
    shown = sorted(json.loads(done.stdout))
    assert shown == [
        "edgegen_job_workers_busy 0.0",
        'edgegen_jobs{status="queued"} 0.0',
        'edgegen_jobs{status="running"} 0.0',
    ]
