"""The models a node serves, loaded at start-up and swapped on activation.

Fixed-shape models (ONNX, TFLite) get a dynamic batcher; language models (GGUF) a generation
scheduler over llama.cpp.

The store's ACTIVE pointers are the source of truth. `refresh()` compares them with what is loaded
and swaps in a newly activated version without dropping a request: the new version is loaded and
verified first, new requests go to it, and the old batcher finishes its queue before it closes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edgegen.config import Settings
from edgegen.engine.batching import BatchObserver, DynamicBatcher
from edgegen.engine.generation import GenerationObserver, Scheduler
from edgegen.errors import EdgegenError, InvalidInput, ModelNotFound, Overloaded
from edgegen.executors import load_executor, load_llm
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
            await self.scheduler.close()
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
        self._draining: set[asyncio.Task[None]] = set()
        self.loaded = False

    @property
    def ready(self) -> bool:
        return self.loaded and not self._failed

    def names(self) -> list[str]:
        return sorted(self._models)

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
            try:
                served = await asyncio.to_thread(self._load, name, version)
            except EdgegenError as exc:
                self._fail(name, exc)
                continue
            served.start()
            self._models[name] = served
            self._failed.pop(name, None)
            self._swapped(name, served.manifest)
            log.info(
                "model loaded", extra={"model": name, "version": version, "format": served.manifest.format}
            )
            if current is not None:
                self._drain(current)
        for name in set(self._models) - set(wanted):
            self._drain(self._models.pop(name))
            self._swapped(name, None)
        self.loaded = True

    def _load(self, name: str, version: str) -> ServedModel:
        package = self._store.open(name, version)
        try:
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
