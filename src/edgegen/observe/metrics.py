"""Prometheus metrics of a node, prefix `edgegen_`.

With several worker processes (`--workers N`) each process writes its samples to files under
`PROMETHEUS_MULTIPROC_DIR` (set by `edgegen serve` before the workers start) and `/metrics`
adds them up, so any worker answers for the whole node.

A scrape without an operator's credential sees the public view (`PublicView`): every figure, but not the
interpreter's version (`python_info`) and, unless `security.metrics_model_names`, no model names — each
family is summed over its `model` label, so rates and totals still add up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from edgegen.observe.heap import GcCollector
from edgegen.observe.system import SystemCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STATES = ("running", "waiting")  # edgegen_sequences{state}
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PRIVATE_FAMILIES = frozenset({"python_info"})  # the interpreter's version: an operator's business
MODEL_LABEL = "model"


class Evictions(Protocol):
    """What a cache tier pushed out in one call (the cache's `Removed`): by size, by age, by activation."""

    size: int
    expired: int
    invalidated: int


class PublicView:
    """`source`'s families as a scrape without an operator's credential sees them: no `python_info`,
    and unless `model_names`, no `model` label — its series merged (summed; a ratio: the largest, a
    creation time: the earliest).

    generate_latest(PublicView(registry, model_names=False))   # the text a public scrape gets
    """

    def __init__(self, source: Collector, *, model_names: bool) -> None:
        self.source, self.model_names = source, model_names

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if family.name in PRIVATE_FAMILIES:
                continue
            yield family if self.model_names else without_models(family)


def without_models(family: Metric) -> Metric:
    """`family` with its `model` label dropped, the series that differed only there merged into one."""
    if not any(MODEL_LABEL in sample.labels for sample in family.samples):
        return family
    merged: dict[tuple[str, tuple[tuple[str, str], ...]], Sample] = {}
    for sample in family.samples:
        labels = tuple((k, v) for k, v in sample.labels.items() if k != MODEL_LABEL)
        key = (sample.name, labels)
        seen = merged.get(key)
        value = sample.value if seen is None else _merge(family, sample.name, seen.value, sample.value)
        merged[key] = sample._replace(labels=dict(labels), value=value)
    out = Metric(family.name, family.documentation, family.type, family.unit)
    out.samples = list(merged.values())
    return out


def _merge(family: Metric, name: str, a: float, b: float) -> float:
    if name.endswith("_created"):
        return min(a, b)
    if family.type == "gauge" and family.name.endswith("_ratio"):
        return max(a, b)
    return a + b


class NodeMetrics:
    def __init__(self, home: Path | None = None) -> None:
        """`home`: the node's EDGEGEN_HOME, whose filesystem the disk figures describe; with it, the
        machine's and the node processes' figures are exported too (observe/system.py)."""
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry(auto_describe=True)
        self.system = SystemCollector(home, self.multiprocess) if home is not None else None
        r = self.registry
        self.request_seconds = Histogram(
            "edgegen_request_duration_seconds",
            "Time from request start to the last byte of the response.",
            ["route", "method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.responses = Counter(
            "edgegen_responses_total", "Responses by route and HTTP status.", ["route", "status"], registry=r
        )
        self.queue_depth = Gauge(
            "edgegen_queue_depth",
            "Requests waiting for a batch.",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        # With `--workers N` each worker has its own queue: capacities add up as depths do.
        self.queue_capacity = Gauge(
            "edgegen_queue_capacity",
            "Requests the batching queue holds before the node answers 503 (max_queue_size).",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.batch_rows = Histogram(
            "edgegen_batch_size", "Rows in one forward pass.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "edgegen_batch_requests",
            "Requests in one forward pass.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "edgegen_inference_duration_seconds",
            "Time of one forward pass (a whole batch).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.models_loaded = Gauge(
            "edgegen_models_loaded",
            "Model versions loaded and served.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ttft_seconds = Histogram(
            "edgegen_time_to_first_token_seconds",
            "From a generation's arrival to its first token.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_seconds = Histogram(
            "edgegen_inter_token_latency_seconds",
            "Between two tokens of one generation.",
            ["model"],
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.prompt_tokens = Counter(
            "edgegen_prompt_tokens_total", "Prompt tokens received.", ["model"], registry=r
        )
        self.prefix_cache_tokens = Counter(
            "edgegen_prefix_cache_hit_tokens_total",
            "Prompt tokens whose KV cache was reused instead of computed.",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "edgegen_generated_tokens_total", "Tokens generated.", ["model"], registry=r
        )
        self.sequences = Gauge(
            "edgegen_sequences",
            "Generations by state.",
            ["model", "state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.kv_cache_usage = Gauge(
            "edgegen_kv_cache_usage_ratio",
            "Share of the sequences' KV positions holding tokens (cached prefixes included).",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.kv_cache_wanted = Gauge(
            "edgegen_kv_cache_wanted_ratio",
            "KV positions the running generations may come to hold (prompt and max_tokens) and the first "
            "waiting one needs, over all positions: above 1, it waits for the cache, not for a slot.",
            ["model"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.decode_step_tokens = Histogram(
            "edgegen_decode_step_tokens",
            "Tokens in one decode step.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "edgegen_cache_hits_total",
            "Answers served from the response cache.",
            ["model", "tier"],
            registry=r,
        )
        self.cache_misses = Counter(
            "edgegen_cache_misses_total",
            "Cacheable requests computed because the cache lacked their answer.",
            ["model"],
            registry=r,
        )
        self.cache_bypasses = Counter(
            "edgegen_cache_bypasses_total",
            "Requests of a cached model that did not read the cache (sampled, or Cache-Control: no-cache).",
            ["model"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "edgegen_cache_evictions_total",
            "Entries removed: to stay in bounds (size), expired, or invalidated by a new model version.",
            ["tier", "reason"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "edgegen_cache_bytes",
            "Bytes held by each cache tier.",
            ["tier"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.cache_entries = Gauge(
            "edgegen_cache_entries",
            "Entries held by each cache tier.",
            ["tier"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.jobs = Gauge(
            "edgegen_jobs",
            "Jobs in the node's queue by status (read at each scrape).",
            ["status"],
            registry=r,
            # The queue's, whichever worker read it: the latest reading, not the largest one ever read.
            multiprocess_mode="livemostrecent",
        )
        self.jobs_running_here = Gauge(
            "edgegen_job_workers_busy",
            "Job workers running a job now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.job_runs = Counter(
            "edgegen_job_runs_total",
            "Job attempts by outcome: finished (any answer but 5xx/429), retried, failed (out of attempts), "
            "stopped (cancelled or lease lost).",
            ["outcome"],
            registry=r,
        )
        self.job_run_seconds = Histogram(
            "edgegen_job_run_duration_seconds",
            "Time of one job attempt, from claim to its outcome.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self._per_model: dict[str, tuple[Any, Any, Any, Any]] = {}
        self._capacities: dict[str, int] = {}
        if not self.multiprocess:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
            r.register(GcCollector())
            if self.system is not None:
                r.register(self.system)

    def on_served(self, model: str, serving: bool, loaded: int) -> None:
        """`model` starts serving a version, or (not `serving`) is served no more: its gauges go (with
        worker processes they stay, at 0: prometheus_client cannot remove a series from their files),
        so no alert reads its last queue or KV cache as if it were still there. `loaded`: the models
        now served."""
        self.models_loaded.set(loaded)
        if serving:
            return
        alone = (self.queue_depth, self.queue_capacity, self.kv_cache_usage, self.kv_cache_wanted)
        gauges = [*((gauge, (model,)) for gauge in alone), *((self.sequences, (model, s)) for s in STATES)]
        for gauge, labels in gauges:
            gauge.labels(*labels).set(0)
            if not self.multiprocess:
                gauge.remove(*labels)
        self._per_model.pop(model, None)
        self._capacities.pop(model, None)

    # BatchObserver
    def _model_children(self, model: str) -> tuple[Any, Any, Any, Any]:
        children = self._per_model.get(model)
        if children is None:
            children = (
                self.queue_depth.labels(model),
                self.batch_rows.labels(model),
                self.batch_requests.labels(model),
                self.inference_seconds.labels(model),
            )
            self._per_model[model] = children
        return children

    def on_queue(self, model: str, depth: int, capacity: int) -> None:
        self._model_children(model)[0].set(depth)
        if self._capacities.get(model) != capacity:  # set when it changes, not at every request
            self._capacities[model] = capacity
            self.queue_capacity.labels(model).set(capacity)

    def on_batch(self, model: str, rows: int, requests: int, seconds: float) -> None:
        _, batch_rows, batch_requests, inference_seconds = self._model_children(model)
        batch_rows.observe(rows)
        batch_requests.observe(requests)
        inference_seconds.observe(seconds)

    # GenerationObserver
    def on_state(
        self, model: str, running: int, waiting: int, kv_used: int, kv_total: int, kv_wanted: int
    ) -> None:
        self.sequences.labels(model, STATES[0]).set(running)
        self.sequences.labels(model, STATES[1]).set(waiting)
        self.kv_cache_usage.labels(model).set(kv_used / kv_total if kv_total else 0.0)
        self.kv_cache_wanted.labels(model).set(kv_wanted / kv_total if kv_total else 0.0)

    def on_step(self, model: str, tokens: int) -> None:
        self.decode_step_tokens.labels(model).observe(tokens)

    def on_first_token(self, model: str, seconds: float, prompt_tokens: int, cached_tokens: int) -> None:
        self.ttft_seconds.labels(model).observe(seconds)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.prefix_cache_tokens.labels(model).inc(cached_tokens)
        self.generated_tokens.labels(model).inc()

    def on_token(self, model: str, seconds: float) -> None:
        self.inter_token_seconds.labels(model).observe(seconds)
        self.generated_tokens.labels(model).inc()

    # CacheObserver
    def on_lookup(self, model: str, result: str, tier: str | None) -> None:
        if result == "hit":
            self.cache_hits.labels(model, tier).inc()
        elif result == "miss":
            self.cache_misses.labels(model).inc()
        else:
            self.cache_bypasses.labels(model).inc()

    def on_removed(self, tier: str, removed: Evictions) -> None:
        for reason, count in (
            ("size", removed.size),
            ("expired", removed.expired),
            ("invalidated", removed.invalidated),
        ):
            if count:
                self.cache_evictions.labels(tier, reason).inc(count)

    def on_size(self, tier: str, size: int, entries: int) -> None:
        self.cache_bytes.labels(tier).set(size)
        self.cache_entries.labels(tier).set(entries)

    # JobObserver
    def on_job_run(self, outcome: str, seconds: float) -> None:
        self.job_runs.labels(outcome).inc()
        self.job_run_seconds.observe(seconds)

    def on_jobs(self, counts: dict[str, int]) -> None:
        for status, count in counts.items():
            self.jobs.labels(status).set(count)

    def on_busy(self, busy: int) -> None:
        self.jobs_running_here.set(busy)

    def observe_request(self, route: str, method: str, model: str, status: int, seconds: float) -> None:
        # Label lookups cost more than the observation; routes x models x statuses stay few.
        key = (route, method, model, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.request_seconds.labels(route, method, model),
                self.responses.labels(route, str(status)),
            )
            self._children[key] = children
        children[0].observe(seconds)
        children[1].inc()

    def render(self, *, full: bool = True, model_names: bool = True) -> bytes:
        """The Prometheus text: everything (`full`), or the public view (`PublicView`)."""
        source = self.registry
        if self.multiprocess:
            source = CollectorRegistry()
            multiprocess.MultiProcessCollector(source)  # type: ignore[no-untyped-call]  # its __init__ is unannotated
            if self.system is not None:
                source.register(self.system)
        return generate_latest(source if full else PublicView(source, model_names=model_names))
