"""The render task: one chunk of items, rendered as one batch, each image stored.

Steps: 1 decode the message and check the job is still wanted, 2 skip what is already
stored, 3 load the model, 4 render (split if memory runs short), 5 encode PNGs with
their infotext, 6 upload images then records, 7 report progress, and assemble the
manifest if this chunk completed the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import redis
import torch
from PIL import Image

from farm import __version__, explain, fairshare, infotext, keys, manifest, metrics, png, pool, webhooks
from farm.errors import BrokerUnavailable, ModelError, PermanentError, RetriableError, StoreUnavailable
from farm.jobs import JobState
from farm.message import RenderMessage
from farm.plan import Chunk, Item
from farm.retry import with_backoff
from farm.spec import STORE_PREFIX
from farm.store import KeyMissing, Store
from workers import images, render, reporting
from workers.reporting import JobCancelled
from workers.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    item: Item
    key: str
    png: bytes
    record: dict


def batch_digest(chunk: Chunk, item: Item) -> str:
    """Everything that decides an image's bytes: its parameters and the batch it is drawn in."""
    batch = [i.index for i in chunk.items]
    data = json.dumps({"item": item.to_dict(), "batch": batch}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def already_stored(store: Store, chunk: Chunk, item: Item) -> bool:
    try:
        record = json.loads(store.get(keys.record(chunk.job_id, item.index)))
    except KeyMissing:
        return False
    return record.get("params") == batch_digest(chunk, item) and store.exists(record["key"])


def fetcher(runtime: Runtime, store: Store):
    """Init images and masks by `store:` key, decoded once per process (keys are content-addressed)."""

    def fetch(ref: str) -> Image.Image:
        key = ref.removeprefix(STORE_PREFIX)
        cache = runtime.inputs
        if (store.url, key) not in cache:
            data = with_backoff(lambda: store.get(key), f"fetching {key}")
            cache[(store.url, key)] = images.decode(data, f"input image {key}")
            while len(cache) > 16:
                cache.pop(next(iter(cache)))
        return cache[(store.url, key)]

    return fetch


#: A chunk that meets a transient error (the store or Redis down past the retry budget)
#: is handed back this many times before its items fail with the reason.
MAX_TRANSIENT_ATTEMPTS = 3


def run_chunk(runtime: Runtime, kwargs: dict, worker: str) -> list[Output]:
    # 1. Decode, and look at the job first: a paused job gets the chunk back, a cancelled
    #    or forgotten one drops it.
    message = RenderMessage.from_kwargs(kwargs)
    chunk, store_url = message.chunk, message.store
    timing: tuple[float, float] | None = None
    try:
        state, delivery = runtime.board.start_chunk(chunk.job_id, chunk.number, worker, chunk.batch_size)
        if delivery > 1:
            metrics.REDELIVERIES.inc()
        if state is JobState.PAUSED:
            runtime.board.hand_back(chunk.job_id, chunk.number)
            metrics.HANDED_BACK.labels("paused").inc()
            return []
        if state is None or not state.runnable:
            log.info("chunk %s/%d dropped: the job is %s", chunk.job_id, chunk.number,
                     state.value if state else "unknown")
            return []
        started = time.time()
        outputs = _run(runtime, chunk, store_url, worker, delivery)
        if outputs:
            timing = (started, time.time())
        return outputs
    finally:
        _quietly(_wrap_up, runtime, worker, chunk, message, timing)


def _run(runtime: Runtime, chunk: Chunk, store_url: str, worker: str, delivery: int) -> list[Output]:
    store = runtime.store(store_url)
    # 2. Skip items counted done (a job rebuilt from its store counts what is there). A chunk
    #    started before may also have stored items its worker never counted, so on a second
    #    delivery the store is asked: an image and a record with the same parameters.
    done = with_backoff(lambda: runtime.board.done_among(chunk.job_id, [it.index for it in chunk.items]),
                        "reading done items")
    missing = [it for it in chunk.items if it.index not in done]
    if delivery > 1:
        missing = [it for it in missing if not with_backoff(
            lambda it=it: already_stored(store, chunk, it), "checking stored items")]
    outputs: list[Output] = []
    if missing:
        try:
            outputs = _render_and_store(runtime, store, chunk, missing, worker)
        except JobCancelled:
            log.info("chunk %s/%d stopped: the job was cancelled", chunk.job_id, chunk.number)
            return []
        except RetriableError as e:
            _try_later(runtime, store, chunk, e)
            return []
        except Exception as e:
            # Recorded, then raised: the items end failed with the reason instead of
            # leaving the job waiting forever, and Celery logs the traceback.
            _fail(runtime, store, chunk, _reason(e))
            raise
    else:
        log.info("chunk %s/%d already stored; skipping", chunk.job_id, chunk.number)
    # 7. Report.
    _report(runtime, store, chunk.job_id, [it.index for it in chunk.items])
    return outputs


def _wrap_up(runtime: Runtime, worker: str, chunk: Chunk, message: RenderMessage,
             timing: tuple[float, float] | None) -> None:
    """One round trip after every chunk: it no longer runs, the worker is idle, its slot is free
    (which wakes the feeder), and the fair-share charge is settled with the seconds it took."""
    with runtime.redis.pipeline(transaction=False) as pipe:
        runtime.board.clear_running(chunk.job_id, chunk.number, pipe)
        if timing:
            started, finished = timing
            runtime.pace.add(started, finished, chunk.batch_size)
            seconds = finished - started
            runtime.board.set_pace(chunk.job_id, seconds / chunk.batch_size, pipe)
            first = chunk.items[0]
            pipe.hset(keys.PACE, keys.pace_field(first.model, first.width, first.height),
                      round(seconds / chunk.batch_size / explain.denoising_steps(first), 6))
            fairshare.settle(pipe, message.charge, seconds)
        pool.publish(pipe, worker, **reporting.idle_fields(runtime, runtime.pace))
        pool.finished_chunk(pipe, worker, chunk.job_id, chunk.number)
        pipe.execute()


def _render_and_store(runtime: Runtime, store: Store, chunk: Chunk, missing: list[Item], worker: str) -> list[Output]:
    # 3. Load the model and any VAE override (cached in this process).
    first = chunk.items[0]
    model = runtime.models.get(first.model)
    vae = runtime.models.vae(first.vae) if first.vae else None
    runtime.loras.fetch(chunk.items, lambda key: with_backoff(lambda: store.get(key), f"fetching {key}"))
    if runtime.models.loads != runtime.published_loads:
        pool.publish(runtime.redis, worker, models=runtime.models.refs(), loads=runtime.models.loads)
        runtime.published_loads = runtime.models.loads
    # 4. Render the whole chunk, in as few forward passes as fit (each image in its planned batch).
    started = time.perf_counter()
    reporter = reporting.StepReporter(runtime.board, worker, chunk)
    pictures, batches = _render_batches(runtime, model, chunk.items, fetcher(runtime, store), vae, reporter)
    seconds = (time.perf_counter() - started) / len(pictures)
    # 5. Encode the images that are missing.
    wanted = {it.index for it in missing}
    drawn = Drawn(chunk=chunk, model=model, vae=vae, seconds=seconds, worker=worker, device=runtime.device_name,
                  batches=batches)
    outputs = [drawn.output(pos, item, image)
               for pos, (item, image) in enumerate(zip(chunk.items, pictures)) if item.index in wanted]
    # 6. Upload each image, then its record: a record always points at a stored image.
    for out in outputs:
        with_backoff(lambda out=out: store.put(out.key, out.png, "image/png"), f"uploading {out.key}")
        record = json.dumps(out.record, ensure_ascii=False).encode()
        with_backoff(lambda: store.put(keys.record(chunk.job_id, out.item.index), record, "application/json"),
                     "uploading record")
    if outputs:
        with_backoff(lambda: _announce(runtime, chunk.job_id, outputs), "queueing webhooks")
    _measure(runtime, model.name, chunk.items[0], seconds, len(outputs))
    return outputs


def _measure(runtime: Runtime, model: str, first: Item, seconds: float, images: int) -> None:
    metrics.IMAGES.labels(model).inc(images)
    size = f"{first.width}x{first.height}"
    for _ in range(images):
        metrics.IMAGE_SECONDS.labels(model, size).observe(seconds)
    if runtime.device.type == "cuda":
        metrics.MEMORY.labels("cuda").set(torch.cuda.memory_allocated())
    else:
        metrics.MEMORY.labels("rss").set(_resident_bytes())


def _resident_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _announce(runtime: Runtime, job_id: str, outputs: list[Output]) -> None:
    """With `webhook_each`, queue a POST of each stored image's record."""
    [header] = runtime.board.headers([job_id])
    if header is None or not header.webhook_each:
        return
    with runtime.redis.pipeline(transaction=False) as pipe:
        for out in outputs:
            webhooks.enqueue(pipe, webhooks.item_stored_id(job_id, out.item.index), header.webhook,
                             {"event": "item.stored", "job": job_id, **out.record})
        pipe.execute()


def _render_batches(runtime: Runtime, model, items, fetch, vae, on_step) -> tuple[list, list[list[int]]]:
    """Render a chunk in forward passes of at most the batch this worker can hold for its shape.
    An out-of-memory error halves that batch, remembers it, and retries the same items."""
    first = items[0]
    shape = (model.ref, first.mode, first.width, first.height, first.hires)
    size = min(len(items), runtime.safe_batch.get(shape, runtime.settings.max_batch or len(items)))
    pictures, batches = [], []
    while len(pictures) < len(items):
        part = items[len(pictures):len(pictures) + size]
        try:
            if runtime.settings.inject_oom_above and len(part) > runtime.settings.inject_oom_above:
                raise torch.OutOfMemoryError(f"injected: batch of {len(part)} > {runtime.settings.inject_oom_above}")
            pictures += render.render(model, part, fetch, vae, on_step, runtime.embeddings, runtime.loras)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            if size == 1:
                raise ModelError(f"out of memory at batch size 1 ({first.width}x{first.height}) on "
                                 f"{runtime.device_name}") from e
            size = max(1, len(part) // 2)
            runtime.safe_batch[shape] = size
            metrics.OOM_HALVINGS.inc()
            log.warning("out of memory at batch %d for %s %dx%d; trying %d", len(part), model.name, first.width,
                        first.height, size)
            if runtime.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        batches.append([it.index for it in part])
    return pictures, batches


def _out_of_memory(error: Exception) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _try_later(runtime: Runtime, store: Store, chunk: Chunk, error: Exception) -> None:
    """Hand the chunk back for another go, or fail it when it has had its tries."""
    tries = runtime.board.count_attempt(chunk.job_id, chunk.number)
    if tries >= MAX_TRANSIENT_ATTEMPTS:
        _fail(runtime, store, chunk, f"gave up after {tries} tries: {_reason(error)}")
        return
    log.warning("chunk %s/%d: %s; handing it back (try %d of %d)", chunk.job_id, chunk.number, error, tries,
                MAX_TRANSIENT_ATTEMPTS)
    runtime.board.hand_back(chunk.job_id, chunk.number)
    metrics.HANDED_BACK.labels("transient error").inc()


def _reason(error: Exception) -> str:
    if isinstance(error, KeyMissing):
        return f"missing input in the store: {error}"
    if isinstance(error, PermanentError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass(frozen=True)
class Drawn:
    """What a chunk's pictures were drawn with: the same for every image of it."""

    chunk: Chunk
    model: object  # workers.models.LoadedModel
    vae: object | None  # workers.models.LoadedVae
    #: Seconds of rendering per image, over the whole chunk.
    seconds: float
    worker: str
    device: str
    #: The forward passes, as item indexes: the chunk, or parts of it on a worker short of memory.
    batches: list[list[int]]

    def output(self, pos: int, item: Item, image: Image.Image) -> Output:
        model, vae, chunk = self.model, self.vae, self.chunk
        text = infotext.for_item(item, model_name=model.name, model_hash=model.hash,
                                 vae_name=vae.name if vae else None, vae_hash=vae.hash if vae else None,
                                 version=f"farm {__version__}", extra=image.info.get(render.EXTRA_PARAMS))
        data = png.encode(image, text)
        key = keys.image(chunk.job_id, item.index, item.seed)
        record = {
            **item.to_dict(),
            "key": key,
            "model": model.name,
            "model_ref": item.model,
            "model_hash": model.hash,
            "vae_hash": vae.hash if vae else None,
            "sha256": hashlib.sha256(data).hexdigest(),
            "worker": self.worker,
            "device": self.device,
            "seconds": round(self.seconds, 4),
            "batch": chunk.number,
            "batch_size": chunk.batch_size,
            "batch_position": pos,
            "rendered_with": next(b for b in self.batches if item.index in b),
            "params": batch_digest(chunk, item),
        }
        return Output(item, key, data, record)


def _report(runtime: Runtime, store: Store, job_id: str, indexes: list[int]) -> None:
    completed = with_backoff(lambda: runtime.board.mark_done(job_id, indexes), "reporting progress")
    if completed:
        _complete(runtime, store, job_id)


def _fail(runtime: Runtime, store: Store, chunk: Chunk, reason: str) -> None:
    reasons = {it.index: reason for it in chunk.items}
    _quietly(_store_failures, store, chunk, reason)
    if with_backoff(lambda: runtime.board.mark_failed(chunk.job_id, reasons), "reporting failure"):
        _complete(runtime, store, chunk.job_id)


def _store_failures(store: Store, chunk: Chunk, reason: str) -> None:
    for item in chunk.items:
        row = {"index": item.index, "seed": item.seed, "prompt": item.prompt, "reason": reason[:2000]}
        store.put(keys.failure_record(chunk.job_id, item.index), json.dumps(row, ensure_ascii=False).encode(),
                  "application/json")


def _complete(runtime: Runtime, store: Store, job_id: str) -> None:
    with_backoff(lambda: manifest.assemble(store, job_id), "writing the manifest")
    state = with_backoff(lambda: runtime.board.close(job_id), "finishing the job")
    log.info("job %s finished: %s", job_id, state.value)


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (redis.RedisError, BrokerUnavailable, StoreUnavailable) as e:
        log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)
