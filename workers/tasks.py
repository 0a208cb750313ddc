"""The render task: one chunk of items, rendered as one batch, each image stored.

Steps: 1 decode the message, 2 skip what is already stored, 3 load the model,
4 render, 5 encode PNGs with their infotext, 6 upload images then records,
7 report progress, and assemble the manifest if this chunk completed the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import redis
from PIL import Image

from farm import __version__, infotext, keys, manifest, png
from farm.errors import PermanentError, RetriableError, StoreUnavailable
from farm.plan import Chunk, Item
from farm.retry import with_backoff
from farm.spec import STORE_PREFIX
from farm.store import KeyMissing, Store
from workers import images, render
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


def run_chunk(runtime: Runtime, message: dict, worker: str) -> list[Output]:
    # 1. Decode.
    chunk, store_url = decode(message)
    store = runtime.store(store_url)
    runtime.board.mark_running(chunk.job_id, chunk.number, worker, chunk.batch_size)
    try:
        # 2. Skip items whose image and record already exist with the same parameters.
        missing = [it for it in chunk.items if not with_backoff(
            lambda it=it: already_stored(store, chunk, it), "checking stored items")]
        if missing:
            try:
                outputs = _render_and_store(runtime, store, chunk, missing, worker)
            except Exception as e:
                # Recorded, then raised: the items end failed with the reason instead of
                # leaving the job waiting forever, and Celery logs the traceback.
                _fail(runtime, store, chunk, _reason(e))
                raise
        else:
            log.info("chunk %s/%d already stored; skipping", chunk.job_id, chunk.number)
            outputs = []
        # 7. Report.
        _report(runtime, store, chunk.job_id, [it.index for it in chunk.items])
        return outputs
    finally:
        _quietly(runtime.board.clear_running, chunk.job_id, chunk.number)


def _render_and_store(runtime: Runtime, store: Store, chunk: Chunk, missing: list[Item], worker: str) -> list[Output]:
    # 3. Load the model and any VAE override (cached in this process).
    first = chunk.items[0]
    model = runtime.models.get(first.model)
    vae = runtime.models.vae(first.vae) if first.vae else None
    # 4. Render the whole batch, so every image is drawn in its planned batch.
    started = time.perf_counter()
    pictures = render.render(model, chunk.items, fetcher(runtime, store), vae)
    seconds = (time.perf_counter() - started) / len(pictures)
    # 5. Encode the images that are missing.
    wanted = {it.index for it in missing}
    outputs = [
        _output(chunk, pos, item, image, model, vae, seconds, worker, runtime.device_name)
        for pos, (item, image) in enumerate(zip(chunk.items, pictures)) if item.index in wanted
    ]
    # 6. Upload each image, then its record: a record always points at a stored image.
    for out in outputs:
        with_backoff(lambda out=out: store.put(out.key, out.png, "image/png"), f"uploading {out.key}")
        record = json.dumps(out.record, ensure_ascii=False).encode()
        with_backoff(lambda: store.put(keys.record(chunk.job_id, out.item.index), record, "application/json"),
                     "uploading record")
    return outputs


def _reason(error: Exception) -> str:
    if isinstance(error, KeyMissing):
        return f"missing input in the store: {error}"
    if isinstance(error, PermanentError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _output(chunk, pos, item, image, model, vae, seconds, worker, device) -> Output:
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
