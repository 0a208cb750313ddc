"""Job state and counters in Redis: written by the dispatcher and the workers, read by everyone.

Counting is exact under redelivery: an item's done bit is set with SETBIT, which
returns the old bit, and only a 0 -> 1 change moves a counter.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import redis

from farm import keys
from farm.errors import JobNotFound


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    DONE = "done"
    DONE_WITH_FAILURES = "done with failures"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.DONE_WITH_FAILURES, JobState.CANCELLED)

    @property
    def runnable(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


# KEYS: job hash, bits to set, bits of the other outcome.
# ARGV: counter to raise, the other counter, now, index...
# Returns {items newly counted, 1 if this call completed the job}.
_MARK = """
local new = 0
for i = 4, #ARGV do
  if redis.call('SETBIT', KEYS[2], ARGV[i], 1) == 0 then
    new = new + 1
    if redis.call('GETBIT', KEYS[3], ARGV[i]) == 1 then
      redis.call('SETBIT', KEYS[3], ARGV[i], 0)
      redis.call('HINCRBY', KEYS[1], ARGV[2], -1)
    end
  end
end
if new == 0 then return {0, 0} end
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], new)
local other = tonumber(redis.call('HGET', KEYS[1], ARGV[2]) or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '-1')
if n + other >= total and redis.call('HSETNX', KEYS[1], 'completed_at', ARGV[3]) == 1 then
  return {new, 1}
end
return {new, 0}
"""


# KEYS: job hash, running hash, deliveries hash. ARGV: chunk, running row, now.
# Returns {state or '', this delivery's number, 0 when the chunk was not started}.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'', 0} end
if state ~= 'queued' and state ~= 'running' then return {state, 0} end
redis.call('HSET', KEYS[1], 'state', 'running')
redis.call('HSETNX', KEYS[1], 'started', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return {state, redis.call('HINCRBY', KEYS[3], ARGV[1], 1)}
"""


class ChunkStart(NamedTuple):
    #: The job's state before the chunk started, or None for a job Redis does not know.
    state: JobState | None
    #: 1 for the chunk's first start, 2 for the second...; 0 when it was not started.
    delivery: int


@dataclass
class JobStatus:
    job_id: str
    state: JobState
    total: int
    done: int
    failed: int
    running: int
    store: str
    created: float
    started: float | None
    completed: float | None
    failures: dict[int, str] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    user: str = ""
    name: str = ""
    lane: str = "batch"
    priority: int = 0
    #: Steps done of the chunks being rendered, as a fraction of an item each: live progress.
    partial: float = 0.0

    @property
    def queued(self) -> int:
        return max(0, self.total - self.done - self.failed - self.running)

    @property
    def finished(self) -> bool:
        return self.state.finished

    @property
    def eta_seconds(self) -> float | None:
        if not self.started or self.done == 0 or self.finished:
            return None
        rate = self.done / max(1e-6, time.time() - self.started)
        return (self.total - self.done - self.failed) / rate


class JobBoard:
    """Reads and writes job state in Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._mark = client.register_script(_MARK)
        self._start = client.register_script(_START)

    @classmethod
    def from_url(cls, url: str) -> "JobBoard":
        return cls(redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30))

    def create(self, job_id: str, total: int, chunks: int, store_url: str, user: str, name: str = "",
               lane: str = "batch", priority: int = 0, created: float | None = None) -> None:
        """Write a job's state; the feeder sees it once it is in its lane (dispatcher.feeder.enlist)."""
        now = created or time.time()
        with self.redis.pipeline() as pipe:
            pipe.delete(*keys.job_keys(job_id))
            pipe.hset(keys.job_hash(job_id), mapping={
                "state": JobState.QUEUED.value, "total": total, "chunks": chunks, "done": 0, "failed": 0,
                "store": store_url, "user": user, "name": name, "created": now, "lane": lane,
                "priority": priority,
            })
            pipe.zadd(keys.JOBS_INDEX, {job_id: now})
            pipe.execute()

    def state(self, job_id: str) -> JobState | None:
        value = self.redis.hget(keys.job_hash(job_id), "state")
        return JobState(value.decode()) if value else None

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_hash(job_id)))

    def start_chunk(self, job_id: str, chunk: int, worker: str, items: int) -> ChunkStart:
        """In one round trip: the job's state, and if it is runnable, the chunk marked running
        (and the job too). A paused, cancelled, finished or unknown job's chunk is not marked."""
        state, delivery = self._start(keys=[keys.job_hash(job_id), keys.running(job_id), keys.deliveries(job_id)],
                                      args=[chunk, json.dumps({"worker": worker, "items": items,
                                                               "since": time.time()}), time.time()])
        return ChunkStart(JobState(state.decode()) if state else None, int(delivery))

    def done_among(self, job_id: str, indexes: list[int]) -> set[int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.getbit(keys.done_bits(job_id), index)
            return {i for i, bit in zip(indexes, pipe.execute()) if bit}

    def clear_running(self, job_id: str, chunk: int) -> None:
        self.redis.hdel(keys.running(job_id), chunk)

    def mark_done(self, job_id: str, indexes: list[int]) -> bool:
        """Count these items done. True when this call completed the job."""
        return self._count(job_id, indexes, keys.done_bits(job_id), keys.failed_bits(job_id), "done", "failed")

    def mark_failed(self, job_id: str, reasons: dict[int, str]) -> bool:
        """Count these items failed, with their reasons. True when this call completed the job."""
        if reasons:
            self.redis.hset(keys.failures(job_id), mapping={str(i): r[:2000] for i, r in reasons.items()})
        done = self.redis.pipeline()
        for i in reasons:
            done.getbit(keys.done_bits(job_id), i)
        fresh = [i for i, bit in zip(reasons, done.execute()) if not bit]
        return self._count(job_id, fresh, keys.failed_bits(job_id), keys.done_bits(job_id), "failed", "done")

    def _count(self, job_id, indexes, bits, other_bits, counter, other) -> bool:
        if not indexes:
            return False
        _, completed = self._mark(
            keys=[keys.job_hash(job_id), bits, other_bits], args=[counter, other, time.time(), *indexes]
        )
        return bool(completed)

    def deliveries(self, job_id: str) -> dict[int, int]:
        """How many times each started chunk was started."""
        return {int(k): int(v) for k, v in self.redis.hgetall(keys.deliveries(job_id)).items()}

    def finish(self, job_id: str) -> JobState:
        """Set the final state from the counts, and let the job's keys expire."""
        status = self.status(job_id)
        state = JobState.DONE_WITH_FAILURES if status.failed else JobState.DONE
        if status.state is JobState.CANCELLED:
            state = JobState.CANCELLED
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.job_hash(job_id), "state", state.value)
            pipe.zrem(keys.lane_jobs(status.lane), job_id)
            for key in keys.job_keys(job_id):
                pipe.expire(key, keys.FINISHED_JOB_TTL)
            pipe.execute()
        return state

    def status(self, job_id: str) -> JobStatus:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(keys.job_hash(job_id))
            pipe.hvals(keys.running(job_id))
            pipe.hgetall(keys.failures(job_id))
            data, running, failures = pipe.execute()
        if not data:
            raise JobNotFound(f"no job {job_id!r} in Redis")
        data = {k.decode(): v.decode() for k, v in data.items()}
        running_rows = [json.loads(r) for r in running]
        return JobStatus(
            job_id=job_id,
            state=JobState(data["state"]),
            total=int(data["total"]),
            done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)),
            running=sum(r["items"] for r in running_rows),
            store=data["store"],
            created=float(data["created"]),
            started=float(data["started"]) if "started" in data else None,
            completed=float(data["completed_at"]) if "completed_at" in data else None,
            failures={int(k): v.decode() for k, v in failures.items()},
            workers=sorted({r["worker"] for r in running_rows}),
            user=data.get("user", ""),
            name=data.get("name", ""),
            lane=data.get("lane", "batch"),
            priority=int(data.get("priority", 0)),
            partial=sum(r.get("items", 0) * r.get("fraction", 0.0) for r in running_rows),
        )

    def recent_jobs(self, limit: int = 20) -> list[str]:
        return [j.decode() for j in self.redis.zrevrange(keys.JOBS_INDEX, 0, limit - 1)]
