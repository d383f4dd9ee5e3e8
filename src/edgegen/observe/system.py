"""What the machine and the node's processes use, read from psutil at each scrape.

    edgegen_node_cpu_seconds_total{mode}        CPU time of the node's processes (the server and its
                                                workers together), user and system
    edgegen_node_resident_memory_bytes          their resident memory, summed
    edgegen_node_processes                      how many there are
    edgegen_system_cpu_usage_ratio              the machine's CPU busy share since the previous scrape
    edgegen_system_cpus                         logical CPUs
    edgegen_system_load_average{period}         1, 5 and 15 minutes
    edgegen_system_memory_bytes{state}          total, available, used
    edgegen_system_network_bytes_total{direction}   received / sent on every interface but loopback
    edgegen_system_network_errors_total{direction}  in / out errors and drops on them
    edgegen_system_disk_bytes{state}            total, used, free of the filesystem holding EDGEGEN_HOME
    edgegen_system_disk_io_bytes_total{direction}   read / written by every disk

With several worker processes each scrape is answered by one of them, which reads the whole tree from
the server process, so the figures do not depend on which worker answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass
class NodeUsage:
    user_s: float = 0.0
    system_s: float = 0.0
    rss_bytes: int = 0
    processes: int = 0


class SystemCollector(Collector):
    def __init__(self, home: Path, multiprocess: bool) -> None:
        self.home = home
        # With workers, the process uvicorn started them from is the node; alone, this process is.
        self._root = psutil.Process(os.getppid() if multiprocess else os.getpid())
        psutil.cpu_percent(interval=None)  # the first reading only sets the baseline

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return [psutil.Process()]

    def collect(self) -> Iterator[Metric]:
        yield from self._node()
        yield from self._machine()

    def usage(self) -> NodeUsage:
        """CPU time and resident memory of the node's processes, summed."""
        usage = NodeUsage()
        for process in self._tree():
            with contextlib.suppress(psutil.Error):  # a worker that exits between listing and reading
                with process.oneshot():
                    times = process.cpu_times()
                    memory = process.memory_info()
                usage.user_s += times.user
                usage.system_s += times.system
                usage.rss_bytes += memory.rss
                usage.processes += 1
        return usage

    def _node(self) -> Iterator[Metric]:
        usage = self.usage()
        user, system, rss, count = usage.user_s, usage.system_s, usage.rss_bytes, usage.processes
        cpu = CounterMetricFamily(
            "edgegen_node_cpu_seconds", "CPU time of the node's processes.", labels=["mode"]
        )
        cpu.add_metric(["user"], user)
        cpu.add_metric(["system"], system)
        yield cpu
        yield GaugeMetricFamily(
            "edgegen_node_resident_memory_bytes",
            "Resident memory of the node's processes, summed.",
            value=rss,
        )
        yield GaugeMetricFamily("edgegen_node_processes", "Processes the node runs as.", value=count)

    def _machine(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "edgegen_system_cpu_usage_ratio",
            "The machine's CPU busy share since the previous scrape.",
            value=psutil.cpu_percent(interval=None) / 100,
        )
        yield GaugeMetricFamily("edgegen_system_cpus", "Logical CPUs.", value=psutil.cpu_count() or 0)
        load = GaugeMetricFamily("edgegen_system_load_average", "Load average.", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), os.getloadavg(), strict=True):
            load.add_metric([period], value)
        yield load
        memory = psutil.virtual_memory()
        mem = GaugeMetricFamily("edgegen_system_memory_bytes", "The machine's memory.", labels=["state"])
        for state in ("total", "available", "used"):
            mem.add_metric([state], getattr(memory, state))
        yield mem
        received = sent = errors_in = errors_out = 0
        for name, nic in psutil.net_io_counters(pernic=True).items():
            if name == "lo":
                continue
            received += nic.bytes_recv
            sent += nic.bytes_sent
            errors_in += nic.errin + nic.dropin
            errors_out += nic.errout + nic.dropout
        net = CounterMetricFamily(
            "edgegen_system_network_bytes", "Bytes over every interface but loopback.", labels=["direction"]
        )
        net.add_metric(["received"], received)
        net.add_metric(["sent"], sent)
        yield net
        faults = CounterMetricFamily(
            "edgegen_system_network_errors", "Errors and drops on those interfaces.", labels=["direction"]
        )
        faults.add_metric(["in"], errors_in)
        faults.add_metric(["out"], errors_out)
        yield faults
        with contextlib.suppress(OSError):
            usage = psutil.disk_usage(str(self.home if self.home.exists() else Path("/")))
            disk = GaugeMetricFamily(
                "edgegen_system_disk_bytes", "The filesystem holding EDGEGEN_HOME.", labels=["state"]
            )
            for state in ("total", "used", "free"):
                disk.add_metric([state], getattr(usage, state))
            yield disk
        io = psutil.disk_io_counters()
        if io is not None:
            disk_io = CounterMetricFamily(
                "edgegen_system_disk_io_bytes", "Bytes read and written by every disk.", labels=["direction"]
            )
            disk_io.add_metric(["read"], io.read_bytes)
            disk_io.add_metric(["write"], io.write_bytes)
            yield disk_io
