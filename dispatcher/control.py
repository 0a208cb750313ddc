"""Cancel, pause, resume and re-prioritise a job; `resume` also rebuilds a job lost with Redis.

Cancel and pause only change the job's state: the feeder stops handing out its chunks
at once, a worker drops (cancel) or hands back (pause) a chunk of it that it has not
started, and a worker rendering one stops at its next denoising step (cancel) or
finishes it (pause). Images already stored stay.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from dispatcher.feeder import load_plan
from dispatcher.submit import register
from farm import keys, manifest, pool
from farm.errors import JobNotFound
from farm.jobs import JobBoard, JobState, JobStateError  # noqa: F401 - JobStateError is raised from here
from farm.store import KeyMissing, Store

#: The states a job may be cancelled from.
_CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED)

_IMAGE_NAME = re.compile(r"(\d+)-(\d+)\.png$")


@dataclass(frozen=True)
class Rebuilt:
    job_id: str
    total: int
    already_stored: int


def cancel(board: JobBoard, store: Store | None, job_id: str) -> JobState:
    """Stop the job for good. Returns the state it had."""
    before = board.move(job_id, JobState.CANCELLED, _CANCELLABLE)
    board.close(job_id)
    if store is not None:
        manifest.assemble(store, job_id)  # what was stored, for `farm results`
    return before


def pause(board: JobBoard, job_id: str) -> JobState:
    return board.move(job_id, JobState.PAUSED, (JobState.QUEUED, JobState.RUNNING))


def set_priority(board: JobBoard, job_id: str, priority: int) -> None:
    board.set_priority(job_id, priority)
    pool.wake(board.redis, job_id)


def resume(board: JobBoard, store: Store, job_id: str) -> JobState | Rebuilt:
    """Resume a paused job; rebuild one that Redis no longer knows or that has ended.

    Returns the state a paused or running job had, or what a rebuild found in the store."""
    state = board.state(job_id)
    if state is JobState.PAUSED:
        started = board.header(job_id).started is not None
        board.move(job_id, JobState.RUNNING if started else JobState.QUEUED, (JobState.PAUSED,))
    elif state is None or not state.runnable:
        return rebuild(board, store, job_id)
    # Back in its lane, in case a submission died between writing the job and enlisting it.
    header = board.header(job_id)
    board.redis.zadd(keys.lane_jobs(header.lane), {job_id: header.created}, nx=True)
    pool.wake(board.redis, job_id)
    return state


def rebuild(board: JobBoard, store: Store, job_id: str) -> Rebuilt:
    """Compare the job's spec with the objects in the store and queue only what is missing."""
    try:
        job = json.loads(store.get(keys.job_json(job_id)))
    except KeyMissing:
        raise JobNotFound(f"no job {job_id!r} in Redis or in the store {store.url}") from None
    plan = load_plan(store, job_id)
    stored = _stored_items(store, job_id)
    register(board, job_id, plan, store_url=store.url, user=job.get("user", "unknown"), created=float(job["created"]))
    completed = False
    ordered = sorted(stored)
    for start in range(0, len(ordered), 10_000):
        completed = board.mark_done(job_id, ordered[start:start + 10_000]) or completed
    if completed:
        manifest.assemble(store, job_id)
        board.close(job_id)
    return Rebuilt(job_id, plan.item_count, len(stored))


def _stored_items(store: Store, job_id: str) -> set[int]:
    """Items with both an image and a record (a record is written after its image)."""
    images = set()
    for key in store.list(keys.images_prefix(job_id)):
        match = _IMAGE_NAME.search(key)
        if match:
            images.add(int(match.group(1)))
    records = set()
    for key in store.list(keys.records_prefix(job_id)):
        name = key.rsplit("/", 1)[-1].removesuffix(".json")
        if name.isdigit():
            records.add(int(name))
    return images & records
