"""Cancel, pause, resume and re-prioritise a job; `resume` also rebuilds a job lost with Redis.

Cancel and pause only change the job's state: the feeder stops handing out its chunks
at once, a worker drops (cancel) or hands back (pause) a chunk of it that it has not
started, and a worker rendering one stops at its next denoising step (cancel) or
finishes it (pause). Images already stored stay.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

from dispatcher.feeder import load_plan, wake
from dispatcher.submit import register
from farm import keys, manifest
from farm.errors import JobNotFound, PermanentError
from farm.progress import JobBoard, JobState
from farm.store import KeyMissing, Store

#: state -> the state it may move to, for cancel and pause.
_CANCELLABLE = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED)

# Set the state only if it is one of ARGV[2..]: a finished job is never reopened by a race.
_MOVE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
for i = 2, #ARGV do
  if state == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1])
    return state
  end
end
return state
"""

_IMAGE_NAME = re.compile(r"(\d+)-(\d+)\.png$")


class JobStateError(PermanentError):
    """The job is in a state that does not allow this (for example, cancelling a finished job)."""


@dataclass(frozen=True)
class Rebuilt:
    job_id: str
    total: int
    already_stored: int


def _move(board: JobBoard, job_id: str, to: JobState, allowed: tuple[JobState, ...]) -> JobState:
    before = board.redis.eval(_MOVE, 1, keys.job_hash(job_id), to.value, *(s.value for s in allowed))
    if before is None:
        raise JobNotFound(f"no job {job_id!r} in Redis")
    before = JobState(before.decode())
    if before not in allowed:
        raise JobStateError(f"job {job_id} is {before.value}; cannot make it {to.value}")
    return before


def cancel(board: JobBoard, store: Store | None, job_id: str) -> JobState:
    """Stop the job for good. Returns the state it had."""
    before = _move(board, job_id, JobState.CANCELLED, _CANCELLABLE)
    status = board.status(job_id)
    with board.redis.pipeline() as pipe:
        pipe.hset(keys.job_hash(job_id), "completed_at", time.time())
        pipe.delete(keys.handed_back(job_id))
        pipe.zrem(keys.lane_jobs(status.lane), job_id)
        for key in keys.job_keys(job_id):
            pipe.expire(key, keys.FINISHED_JOB_TTL)
        pipe.execute()
    if store is not None:
        manifest.assemble(store, job_id)  # what was stored, for `farm results`
    return before


def pause(board: JobBoard, job_id: str) -> JobState:
    return _move(board, job_id, JobState.PAUSED, (JobState.QUEUED, JobState.RUNNING))


def set_priority(board: JobBoard, job_id: str, priority: int) -> None:
    if not board.exists(job_id):
        raise JobNotFound(f"no job {job_id!r} in Redis")
    board.redis.hset(keys.job_hash(job_id), "priority", priority)
    wake(board.redis, job_id)


def resume(board: JobBoard, store: Store, job_id: str) -> JobState | Rebuilt:
    """Resume a paused job; rebuild one that Redis no longer knows or that has ended.

    Returns the state a paused or running job had, or what a rebuild found in the store."""
    state = board.state(job_id)
    if state is JobState.PAUSED:
        started = board.redis.hexists(keys.job_hash(job_id), "started")
        _move(board, job_id, JobState.RUNNING if started else JobState.QUEUED, (JobState.PAUSED,))
    elif state is None or not state.runnable:
        return rebuild(board, store, job_id)
    # Back in its lane, in case a submission died between writing the job and enlisting it.
    lane, created = board.redis.hmget(keys.job_hash(job_id), "lane", "created")
    board.redis.zadd(keys.lane_jobs(lane.decode()), {job_id: float(created)}, nx=True)
    wake(board.redis, job_id)
    return state


def rebuild(board: JobBoard, store: Store, job_id: str) -> Rebuilt:
    """Compare the job's spec with the objects in the store and queue only what is missing."""
    try:
        job = json.loads(store.get(keys.job_json(job_id)))
    except KeyMissing:
        raise JobNotFound(f"no job {job_id!r} in Redis or in the store {store.url}") from None
    plan = load_plan(store, job_id)
    stored = _stored_items(store, job_id)
    register(board, job_id, plan, store.url, job.get("user", "unknown"), plan.spec, float(job["created"]))
    completed = False
    ordered = sorted(stored)
    for start in range(0, len(ordered), 10_000):
        completed = board.mark_done(job_id, ordered[start:start + 10_000]) or completed
    if completed:
        manifest.assemble(store, job_id)
        board.finish(job_id)
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
