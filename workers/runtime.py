"""What a worker process makes once and keeps: device, model cache, stores, Redis clients.

Created in Celery's `worker_process_init`, after the fork, so CUDA is initialised
in the process that uses it and never in the parent.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import redis
import torch

from farm.connections import connect
from farm.errors import PermanentError
from farm.jobs import JobBoard
from farm.settings import Settings
from farm.store import Store, open_store
from workers.device import describe, dtype_for, select_device
from workers.embeddings import EmbeddingLibrary
from workers.lora import LoraLibrary
from workers.models import ModelCache
from workers.reporting import Pace

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    device: torch.device
    device_name: str
    models: ModelCache
    redis: redis.Redis
    board: JobBoard
    hostname: str = field(default_factory=socket.gethostname)
    #: Decoded init images and masks by (store, key); a few, most recent last.
    inputs: dict = field(default_factory=dict)
    #: The largest batch that fitted, by (model, mode, width, height, hires), learnt from
    #: out-of-memory errors; kept for the life of the process.
    safe_batch: dict = field(default_factory=dict)
    #: The operator's textual-inversion embeddings, read on first use.
    embeddings: EmbeddingLibrary = field(default_factory=lambda: EmbeddingLibrary(None))
    #: The operator's LoRAs, each read once.
    loras: LoraLibrary = field(default_factory=lambda: LoraLibrary(None))
    pace: Pace = field(default_factory=Pace)
    #: Model loads last written to the worker's live hash.
    published_loads: int = -1
    _stores: dict[str, Store] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings) -> "Runtime":
        device = select_device(settings.device)
        if settings.cpu_threads:
            torch.set_num_threads(settings.cpu_threads)
        client = connect(settings)
        runtime = cls(
            settings=settings,
            device=device,
            device_name=describe(device),
            models=ModelCache(settings.cache_dir, device, dtype_for(device), config_override=settings.model_configs,
                              allow_pickle=settings.allow_pickle, compile_unet=settings.compile_unet),
            redis=client,
            board=JobBoard(client),
            embeddings=EmbeddingLibrary(settings.embeddings_dir),
            loras=LoraLibrary(settings.lora_dir),
        )
        log.info("worker process ready on %s", runtime.device_name)
        return runtime

    def preload(self) -> None:
        """Import the render path (diffusers is seconds of it) and load the operator's preloaded
        models now, so the first chunk does not wait for them."""
        import workers.tasks  # noqa: F401

        for ref in self.settings.preload:
            try:
                self.models.get(ref)
            except PermanentError as e:
                # Not this process's to fail: the chunks that need the model fail with the reason.
                log.warning("could not preload %s: %s", ref, e)
        log.info("preloaded the render path and %d model(s)", len(self.settings.preload))

    def store(self, url: str) -> Store:
        """One store object (and so one boto3 client) per store URL, for the life of the process."""
        if url not in self._stores:
            self._stores[url] = open_store(url, self.settings)
        return self._stores[url]


_runtime: Runtime | None = None


def init(settings: Settings) -> Runtime:
    global _runtime
    _runtime = Runtime.create(settings)
    return _runtime


def current() -> Runtime:
    if _runtime is None:
        raise RuntimeError("the worker process was not initialised (worker_process_init did not run)")
    return _runtime
