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

from farm import __version__, infotext, keys, manifest, png, pool
from farm.errors import ModelError, PermanentError, RetriableError, StoreUnavailable
from farm.plan import Chunk, Item
from farm.progress import JobState
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


def decode(message: dict) -> tuple[Chunk, str]:
    items = tuple(Item.from_dict(d) for d in message["items"])
    keys.check_job_id(message["job"])
    return Chunk(message["job"], int(message["chunk"]), items), message["store"]


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


def parameters_text(item: Item, model_name: str, model_hash: str, vae=None) -> str:
    inpaint = item.mode == "inpaint"
    only_masked = item.inpaint_area == "only masked"
    params = {
        "Steps": item.steps,
        "Sampler": item.sampler,
        "Schedule type": item.schedule_type,
        "CFG scale": item.cfg_scale,
        "Seed": item.seed,
        "Size": f"{item.width}x{item.height}",
        "Model hash": model_hash or None,
        "Model": model_name,
        "VAE hash": (vae.hash or None) if vae else None,
        "VAE": vae.name if vae else None,
        "Variation seed": item.variation_seed if item.variation_strength else None,
        "Variation seed strength": item.variation_strength or None,
        "Seed resize from": "{}x{}".format(*item.resize_seed_from) if item.resize_seed_from else None,
        "Denoising strength": item.hires[3] if item.hires else item.denoising_strength,
        "Clip skip": item.clip_skip if item.clip_skip > 1 else None,
        "Hires upscale": item.hires[1] if item.hires else None,
        "Hires steps": item.hires[2] if item.hires and item.hires[2] else None,
        "Hires upscaler": item.hires[0] if item.hires else None,
        "Mask blur": item.mask_blur if inpaint else None,
        "Masked content": item.masked_content,
        "Inpaint area": "Only masked" if only_masked else None,
        "Masked area padding": item.padding if only_masked else None,
        "Mask mode": "Inpaint not masked" if item.invert_mask else None,
        "Resize mode": RESIZE_MODE_NAMES[item.resize_mode] if item.mode != "txt2img" and item.resize_mode else None,
        "Fix steps": "True" if item.fix_steps else None,
    }
    return infotext.build(item.prompt, item.negative_prompt, params, version=f"farm {__version__}")


RESIZE_MODE_NAMES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")


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


def run_chunk(runtime: Runtime, message: dict, worker: str) -> list[Output]:
    # 1. Decode, and look at the job first: a paused job gets the chunk back, a cancelled
    #    or forgotten one drops it.
    chunk, store_url = decode(message)
    timing: tuple[float, float] | None = None
    try:
        state, delivery = runtime.board.start_chunk(chunk.job_id, chunk.number, worker, chunk.batch_size)
        if state is JobState.PAUSED:
            runtime.redis.rpush(keys.handed_back(chunk.job_id), chunk.number)
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
    done = with_backoff(lambda: _redis(runtime.board.done_among, chunk.job_id, [it.index for it in chunk.items]),
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


def _wrap_up(runtime: Runtime, worker: str, chunk: Chunk, message: dict, timing: tuple[float, float] | None) -> None:
    """One round trip after every chunk: it no longer runs, the worker is idle, its slot is free
    (which wakes the feeder), and the fair-share charge is settled with the seconds it took."""
    with runtime.redis.pipeline(transaction=False) as pipe:
        pipe.hdel(keys.running(chunk.job_id), chunk.number)
        if timing:
            started, finished = timing
            runtime.pace.add(started, finished, chunk.batch_size)
            seconds = finished - started
            pipe.hset(keys.job_hash(chunk.job_id), "seconds_per_item", round(seconds / chunk.batch_size, 4))
            if message.get("user") and message.get("lane") in keys.LANES:
                pipe.zincrby(keys.lane_shares(message["lane"]), seconds - float(message.get("charge", 0)),
                             message["user"])
        pool.publish(pipe, worker, **reporting.idle_fields(runtime, runtime.pace))
        pool.finished_chunk(pipe, worker, chunk.job_id, chunk.number)
        pipe.execute()


def _render_and_store(runtime: Runtime, store: Store, chunk: Chunk, missing: list[Item], worker: str) -> list[Output]:
    # 3. Load the model and any VAE override (cached in this process).
    first = chunk.items[0]
    model = runtime.models.get(first.model)
    vae = runtime.models.vae(first.vae) if first.vae else None
    if runtime.models.loads != runtime.published_loads:
        pool.publish(runtime.redis, worker, models=runtime.models.refs(), loads=runtime.models.loads)
        runtime.published_loads = runtime.models.loads
    # 4. Render the whole chunk, in as few forward passes as fit (each image in its planned batch).
    started = time.perf_counter()
    reporter = reporting.StepReporter(runtime.redis, worker, chunk)
    pictures, batches = _render_batches(runtime, model, chunk.items, fetcher(runtime, store), vae, reporter)
    seconds = (time.perf_counter() - started) / len(pictures)
    # 5. Encode the images that are missing.
    wanted = {it.index for it in missing}
    outputs = [
        _output(chunk, pos, item, image, model, vae, seconds, worker, runtime.device_name, batches)
        for pos, (item, image) in enumerate(zip(chunk.items, pictures)) if item.index in wanted
    ]
    # 6. Upload each image, then its record: a record always points at a stored image.
    for out in outputs:
        with_backoff(lambda out=out: store.put(out.key, out.png, "image/png"), f"uploading {out.key}")
        record = json.dumps(out.record, ensure_ascii=False).encode()
        with_backoff(lambda: store.put(keys.record(chunk.job_id, out.item.index), record, "application/json"),
                     "uploading record")
    return outputs


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
            pictures += render.render(model, part, fetch, vae, on_step)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            if size == 1:
                raise ModelError(f"out of memory at batch size 1 ({first.width}x{first.height}) on "
                                 f"{runtime.device_name}") from e
            size = max(1, len(part) // 2)
            runtime.safe_batch[shape] = size
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
    tries = runtime.redis.hincrby(keys.attempts(chunk.job_id), chunk.number, 1)
    if tries >= MAX_TRANSIENT_ATTEMPTS:
        _fail(runtime, store, chunk, f"gave up after {tries} tries: {_reason(error)}")
        return
    log.warning("chunk %s/%d: %s; handing it back (try %d of %d)", chunk.job_id, chunk.number, error, tries,
                MAX_TRANSIENT_ATTEMPTS)
    runtime.redis.rpush(keys.handed_back(chunk.job_id), chunk.number)


def _reason(error: Exception) -> str:
    if isinstance(error, KeyMissing):
        return f"missing input in the store: {error}"
    if isinstance(error, PermanentError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _output(chunk, pos, item, image, model, vae, seconds, worker, device, batches) -> Output:
    text = parameters_text(item, model.name, model.hash, vae)
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
        "worker": worker,
        "device": device,
        "seconds": round(seconds, 4),
        "batch": chunk.number,
        "batch_size": chunk.batch_size,
        "batch_position": pos,
        # The forward pass it was drawn in: the chunk, or a part of it on a worker short of memory.
        "rendered_with": next(b for b in batches if item.index in b),
        "params": batch_digest(chunk, item),
    }
    return Output(item, key, data, record)


def _report(runtime: Runtime, store: Store, job_id: str, indexes: list[int]) -> None:
    completed = with_backoff(lambda: _redis(runtime.board.mark_done, job_id, indexes), "reporting progress")
    if completed:
        _complete(runtime, store, job_id)


def _fail(runtime: Runtime, store: Store, chunk: Chunk, reason: str) -> None:
    reasons = {it.index: reason for it in chunk.items}
    if with_backoff(lambda: _redis(runtime.board.mark_failed, chunk.job_id, reasons), "reporting failure"):
        _complete(runtime, store, chunk.job_id)


def _complete(runtime: Runtime, store: Store, job_id: str) -> None:
    with_backoff(lambda: manifest.assemble(store, job_id), "writing the manifest")
    state = with_backoff(lambda: _redis(runtime.board.finish, job_id), "finishing the job")
    log.info("job %s finished: %s", job_id, state.value)


def _redis(fn, *args):
    try:
        return fn(*args)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RetriableError(f"Redis did not answer: {e}") from e


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (redis.RedisError, StoreUnavailable) as e:
        log.warning("%s failed: %s", getattr(fn, "__name__", fn), e)
