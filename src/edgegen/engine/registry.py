"""The models a node serves, loaded at start-up and swapped on activation.

Fixed-shape models (ONNX, TFLite) get a dynamic batcher; language models (GGUF) a generation
scheduler over llama.cpp.

The store's ACTIVE pointers are the source of truth. `refresh()` compares them with what is loaded
and swaps in a newly activated version without dropping a request: the new version is loaded and
verified first, new requests go to it, and the old batcher finishes its queue before it closes.

A model that crashes its runtime must never take the node with it, nor keep it from starting again:

- a GGUF version is loaded in a child process first (executors/probe.py), then in this one;
- `activate()` loads a version before it points ACTIVE at it, so ACTIVE never names a version that did
  not load here;
- a version that fails is not tried again until ACTIVE changes, and when a model's active version
  fails at start-up, the newest earlier version that loads is served instead, with an error logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edgegen.config import Settings
from edgegen.engine.batching import BatchObserver, DynamicBatcher
from edgegen.engine.generation import GenerationObserver, Scheduler
from edgegen.errors import EdgegenError, ExecutorError, InvalidInput, ModelNotFound, Overloaded, Unprocessable
from edgegen.executors import load_executor, load_llm
from edgegen.executors.probe import probe_load, probed
from edgegen.store import Manifest, ModelPackage, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedModel:
    manifest: Manifest
    batcher: DynamicBatcher | None = None
    scheduler: Scheduler | None = None
    package: ModelPackage | None = None  # holds the in-memory plaintext of a model encrypted at rest

    def fixed_shape(self) -> DynamicBatcher:
        """The batcher, or a clear refusal when this model generates text instead."""
        if self.batcher is None:
            name = self.manifest.name
            raise InvalidInput(f"model {name!r} generates text; use /v1/completions or /v1/chat/completions")
        return self.batcher

    def start(self) -> None:
        if self.batcher is not None:
            self.batcher.start()
        if self.scheduler is not None:
            self.scheduler.start()

    async def drain(self) -> None:
        if self.batcher is not None:
            await self.batcher.drain()
        if self.scheduler is not None:
            await self.scheduler.drain()
        if self.package is not None:
            self.package.close()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.package is not None:
            self.package.close()


class ModelRegistry:
    def __init__(
        self,
        store: ModelStore,
        settings: Settings,
        observer: BatchObserver | None = None,
        generation_observer: GenerationObserver | None = None,
        on_swap: Callable[[str, Manifest | None], None] | None = None,
    ) -> None:
        """`on_swap(name, manifest)` hears of each version that starts serving, and of each model that
        stops (`None`): the response cache drops the answers of the others."""
        self._store = store
        self._on_swap = on_swap
        self._settings = settings
        self._observer = observer
        self._generation_observer = generation_observer
        self._models: dict[str, ServedModel] = {}
        self._failed: dict[str, str] = {}
        self._refused: dict[str, str] = {}  # name -> the active version that failed to load here
        self._draining: set[asyncio.Task[None]] = set()
        self._changing = asyncio.Lock()  # one refresh or activation at a time: each loads models
        self.loaded = False

    @property
    def ready(self) -> bool:
        return self.loaded and not self._failed

    def names(self) -> list[str]:
        return sorted(self._models)

    def refused(self) -> dict[str, str]:
        """Each model whose active version failed to load here (an earlier one serves, or none), by name."""
        return dict(self._refused)

    def get(self, name: str) -> ServedModel:
        served = self._models.get(name)
        if served is not None:
            return served
        if not self.loaded:
            raise Overloaded("models are still loading; retry shortly")
        raise ModelNotFound(f"model {name!r} is not served here")

    def is_ready(self, name: str) -> bool:
        return name in self._models

    async def refresh(self) -> None:
        """Load every model whose active version is not the one served; drop removed ones."""
        async with self._changing:
            await self._refresh()

    async def _refresh(self) -> None:
        wanted: dict[str, str] = {}
        for name in self._store.names():
            try:
                version = self._store.active_version(name)
            except EdgegenError as exc:
                self._fail(name, exc)
                continue
            if version is not None:
                wanted[name] = version
        for name, version in wanted.items():
            current = self._models.get(name)
            if current is not None and current.manifest.version == version:
                continue
            if self._refused.get(name) == version:
                continue  # it failed before: tried again when ACTIVE changes, or on an explicit activation
            try:
                served = await asyncio.to_thread(self._load, name, version)
                self._refused.pop(name, None)
            except EdgegenError as exc:
                self._refused[name] = version
                if current is not None:
                    # As at start-up with an earlier version to fall back on: the node serves on, ready,
                    # and says so (`refused`, in its status), rather than leave its fleet for a bad change.
                    log.error(
                        "active version not loaded: still serving the one before",
                        extra={"model": name, "active": version, "version": current.manifest.version,
                               "reason": exc.message},
                    )  # fmt: skip
                    continue
                fallback = await self._fallback(name, version, exc)
                if fallback is None:
                    self._fail(name, exc)
                    continue
                served = fallback
            self._install(name, served, current)
        for name in set(self._models) - set(wanted):
            self._drain(self._models.pop(name))
            self._swapped(name, None)
        self.loaded = True

    async def _fallback(self, name: str, active: str, exc: EdgegenError) -> ServedModel | None:
        """The newest version before `active` that loads, for a model with none served (at start-up)."""
        try:
            versions = self._store.versions(name)
        except EdgegenError:
            return None
        earlier = versions[: versions.index(active)] if active in versions else []
        for version in reversed(earlier):
            try:
                served = await asyncio.to_thread(self._load, name, version)
            except EdgegenError:
                continue
            log.error(
                "active version not loaded: serving an earlier one",
                extra={"model": name, "active": active, "version": version, "reason": exc.message},
            )
            return served
        return None

    async def activate(self, name: str, version: str) -> None:
        """Load `version`, then point ACTIVE at it, then serve it; on any failure ACTIVE and the served
        version stay as they were. Raises Unprocessable (does not load), IntegrityError, ModelNotFound."""
        async with self._changing:
            current = self._models.get(name)
            if current is not None and current.manifest.version == version:
                await asyncio.to_thread(self._store.activate, name, version)
                return
            try:
                served = await asyncio.to_thread(self._load, name, version)
            except ExecutorError as exc:
                raise Unprocessable(f"version {version} of {name!r} failed to load: {exc.message}") from None
            try:
                await asyncio.to_thread(self._store.activate, name, version)
            except BaseException:
                await served.close()
                raise
            self._refused.pop(name, None)
            self._install(name, served, current)

    def _install(self, name: str, served: ServedModel, current: ServedModel | None) -> None:
        served.start()
        self._models[name] = served
        self._failed.pop(name, None)
        self._swapped(name, served.manifest)
        manifest = served.manifest
        log.info(
            "model loaded", extra={"model": name, "version": manifest.version, "format": manifest.format}
        )
        if current is not None:
            self._drain(current)

    def _load(self, name: str, version: str) -> ServedModel:
        package = self._store.open(name, version)
        try:
            # A GGUF in a child process first (it may crash llama.cpp), unless it passed there before.
            probe_load(package, self._settings.llm, remember=probed(self._settings.home))
            return self._serve(package)
        except BaseException:
            package.close()
            raise

    def _serve(self, package: ModelPackage) -> ServedModel:
        name = package.manifest.name
        if package.manifest.format == "gguf":
            llm = self._settings.llm
            executor = load_llm(package.model_path, llm)
            scheduler = Scheduler(
                name,
                executor,
                max_num_seqs=llm.max_num_seqs,
                n_batch=llm.n_batch,
                itl_target_ms=llm.itl_target_ms,
                speculative_tokens=llm.speculative_tokens,
                max_waiting=llm.max_waiting,
                observer=self._generation_observer,
            )
            return ServedModel(package.manifest, scheduler=scheduler, package=package)
        batching = self._settings.batching_for(name)
        executors = [
            load_executor(package.model_path, package.manifest.format, self._settings)
            for _ in range(batching.instances)
        ]
        batcher = DynamicBatcher(name, executors, batching, self._observer)
        return ServedModel(package.manifest, batcher=batcher, package=package)

    def _swapped(self, name: str, manifest: Manifest | None) -> None:
        if self._on_swap is not None:
            self._on_swap(name, manifest)

    def _drain(self, served: ServedModel) -> None:
        # The old version answers what it already queued, then frees its executors.
        task = asyncio.create_task(served.drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _fail(self, name: str, exc: EdgegenError) -> None:
        if self._failed.get(name) != exc.message:
            log.error("model not loaded", extra={"model": name, "reason": exc.message})
        self._failed[name] = exc.message

    async def watch(self, interval: float) -> None:
        """Poll the store's ACTIVE pointers, so `edgegen models activate` takes effect on a running node."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh()
            except Exception:
                log.exception("store refresh failed")

    async def close(self) -> None:
        await asyncio.gather(*self._draining, return_exceptions=True)
        await asyncio.gather(*(m.close() for m in self._models.values()))
        self._models.clear()
