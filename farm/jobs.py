"""A job's state in Redis: its hash (`farm:job:<id>`), the done and failed bitmaps, the
running chunks, and the feeder's cursors and handed-back chunks.

`JobBoard` is the only code that reads or writes a job's keys (`keys.job_keys`), as rq's
`Job` owns its own: submission creates them, the feeder reads them, workers count items
into them, control moves the state, and `close()` ends the job (finished or cancelled).

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

from farm import keys, webhooks
from farm.connections import connect
from farm.errors import JobNotFound, PermanentError


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

    @classmethod
    def decode(cls, raw: bytes | str | None) -> "JobState | None":
        if raw is None:
            return None
        return cls(raw.decode() if isinstance(raw, bytes) else raw)


class JobStateError(PermanentError):
    """The job is in a state that does not allow this (for example, cancelling a finished job)."""


# KEYS: job hash, bits to set, bits of the other outcome, the pool's item counters.
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
local job = redis.call('HMGET', KEYS[1], 'lane', 'user')
redis.call('HINCRBY', KEYS[4], ARGV[1] .. '|' .. (job[1] or 'batch') .. '|' .. (job[2] or ''), new)
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


class ChunkStart(NamedTuple):
    #: The job's state before the chunk started, or None for a job Redis does not know.
    state: JobState | None
    #: 1 for the chunk's first start, 2 for the second...; 0 when it was not started.
    delivery: int


@dataclass
class JobHeader:
    """A job's hash, parsed once, here: what it is, whose, where it stands."""

    job_id: str
    state: JobState
    total: int
    store: str
    created: float
    chunks: int = 0
    done: int = 0
    failed: int = 0
    started: float | None = None
    completed: float | None = None
    user: str = ""
    name: str = ""
    lane: str = "batch"
    priority: int = 0
    #: Measured by the workers (seconds of a chunk / its items); None until a chunk finished.
    seconds_per_item: float | None = None
    #: Where the job's end (and, with webhook_each, each stored image) is posted; "" for nowhere.
    webhook: str = ""
    webhook_each: bool = False
    #: The spec has an [export]: the dispatcher exports the job when it ends.
    export: bool = False
    #: "", then queued, running, `done: ...` or `failed: ...`.
    export_state: str = ""

    @classmethod
    def parse(cls, job_id: str, raw: dict) -> "JobHeader":
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}
        optional = lambda name: float(data[name]) if name in data else None  # noqa: E731
        return cls(
            job_id=job_id, state=JobState(data["state"]), total=int(data["total"]), store=data["store"],
            created=float(data["created"]), chunks=int(data.get("chunks", 0)), done=int(data.get("done", 0)),
            failed=int(data.get("failed", 0)), started=optional("started"), completed=optional("completed_at"),
            user=data.get("user", ""), name=data.get("name", ""), lane=data.get("lane", "batch"),
            priority=int(data.get("priority", 0)), seconds_per_item=optional("seconds_per_item"),
            webhook=data.get("webhook", ""), webhook_each=data.get("webhook_each") == "1",
            export=data.get("export") == "1", export_state=data.get("export_state", ""),
        )

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass
class JobStatus(JobHeader):
    """A job's header and what is live: chunks being rendered, failed items and their reasons."""

    running: int = 0
    failures: dict[int, str] = field(default_factory=dict)
    workers: list[str] = field(default_factory=list)
    #: Steps done of the chunks being rendered, as a fraction of an item each: live progress.
    partial: float = 0.0

    @property
    def queued(self) -> int:
        return max(0, self.total - self.done - self.failed - self.running)

    @property
    def eta_seconds(self) -> float | None:
        if not self.started or self.done == 0 or self.finished:
            return None
        rate = self.done / max(1e-6, time.time() - self.started)
        return (self.total - self.done - self.failed) / rate

    def summary(self) -> dict:
        """The status as plain JSON values: `farm status --json` and `GET /v1/jobs/{id}`."""
        return {
            "job": self.job_id, "state": self.state.value, "user": self.user, "name": self.name,
            "lane": self.lane, "priority": self.priority, "total": self.total, "queued": self.queued,
            "running": self.running, "done": self.done, "failed": self.failed,
            "progress": round((self.done + self.failed + self.partial) / max(1, self.total), 4),
            "eta_seconds": self.eta_seconds, "created": self.created, "started": self.started,
            "completed": self.completed, "workers": self.workers,
            "failures": {str(k): v for k, v in sorted(self.failures.items())},
            "export": self.export_state or None,
        }


def unsettled(done: bytes | None, failed: bytes | None, total: int) -> list[int]:
    """Indexes below `total` with neither bit set (Redis bitmaps: bit 0 is the first byte's top bit)."""
    done, failed = done or b"", failed or b""
    size = -(-total // 8)
    done, failed = done.ljust(size, b"\0"), failed.ljust(size, b"\0")
    missing = []
    for pos in range(size):
        byte = done[pos] | failed[pos]
        if byte != 0xFF:
            missing += [pos * 8 + bit for bit in range(8) if not byte >> (7 - bit) & 1 and pos * 8 + bit < total]
    return missing


class JobBoard:
    """Reads and writes job state in Redis. Methods that take `pipe` queue their commands on
    the caller's pipeline, so a worker's wrap-up stays one round trip."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._mark = client.register_script(_MARK)
        self._start = client.register_script(_START)
        self._move = client.register_script(_MOVE)

    @classmethod
    def from_url(cls, url: str) -> "JobBoard":
        return cls(connect(url))

    # --- a job's life: create, move, close ---------------------------------------------

    def create(self, job_id: str, *, total: int, chunks: int, store_url: str, user: str, name: str = "",
               lane: str = "batch", priority: int = 0, created: float | None = None, webhook: str | None = None,
               webhook_each: bool = False, export: bool = False) -> None:
        """Write a job's state; the feeder sees it once it is in its lane (farm.fairshare.enlist)."""
        now = created or time.time()
        with self.redis.pipeline() as pipe:
            pipe.delete(*keys.job_keys(job_id))
            pipe.hset(keys.job_hash(job_id), mapping={
                "state": JobState.QUEUED.value, "total": total, "chunks": chunks, "done": 0, "failed": 0,
                "store": store_url, "user": user, "name": name, "created": now, "lane": lane,
                "priority": priority,
                **({"webhook": webhook, "webhook_each": int(webhook_each)} if webhook else {}),
                **({"export": 1} if export else {}),
            })
            pipe.zadd(keys.JOBS_INDEX, {job_id: now})
            pipe.zadd(keys.user_jobs(user), {job_id: now})
            pipe.execute()

    def move(self, job_id: str, to: JobState, allowed: tuple[JobState, ...]) -> JobState:
        """Set the state to `to` if it is one of `allowed`, atomically. Returns the state it had."""
        before = self._move(keys=[keys.job_hash(job_id)], args=[to.value, *(s.value for s in allowed)])
        if before is None:
            raise JobNotFound(f"no job {job_id!r} in Redis")
        before = JobState.decode(before)
        if before not in allowed:
            raise JobStateError(f"job {job_id} is {before.value}; cannot make it {to.value}")
        return before

    def close(self, job_id: str) -> JobState:
        """End a job: cancelled if it was cancelled, else done (with failures, if any); out of its
        lane, with nothing left to hand out, its keys set to expire. Returns the final state."""
        status = self.status(job_id)
        if status.state is JobState.CANCELLED:
            state = JobState.CANCELLED
        else:
            state = JobState.DONE_WITH_FAILURES if status.failed else JobState.DONE
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.job_hash(job_id), "state", state.value)
            pipe.hsetnx(keys.job_hash(job_id), "completed_at", time.time())
            pipe.delete(keys.handed_back(job_id))
            pipe.zrem(keys.lane_jobs(status.lane), job_id)
            pipe.rpush(keys.ended(job_id), state.value)
            if status.export and state is not JobState.CANCELLED:
                pipe.hset(keys.job_hash(job_id), "export_state", "queued")
                pipe.rpush(keys.EXPORTS, job_id)
            for key in keys.job_keys(job_id):
                pipe.expire(key, keys.FINISHED_JOB_TTL)
            pipe.execute()
        if status.webhook:
            webhooks.enqueue(self.redis, webhooks.job_ended_id(job_id), status.webhook,
                             {"event": "job.ended", **self.status(job_id).summary()})
        return state

    def set_export_state(self, job_id: str, state: str) -> None:
        self.redis.hset(keys.job_hash(job_id), "export_state", state[:2000])

    def wait_ended(self, job_id: str, timeout: float) -> bool:
        """Block until the job ends or `timeout` seconds pass; True if it ended meanwhile."""
        return bool(self.redis.blmove(keys.ended(job_id), keys.ended(job_id), timeout, "LEFT", "RIGHT"))

    def set_priority(self, job_id: str, priority: int) -> None:
        if not self.exists(job_id):
            raise JobNotFound(f"no job {job_id!r} in Redis")
        self.redis.hset(keys.job_hash(job_id), "priority", priority)

    def set_pace(self, job_id: str, seconds_per_item: float, pipe=None) -> None:
        """The job's measured seconds per item, which the feeder charges its next chunks."""
        (pipe or self.redis).hset(keys.job_hash(job_id), "seconds_per_item", round(seconds_per_item, 4))

    # --- reading -------------------------------------------------------------------------

    def state(self, job_id: str) -> JobState | None:
        return JobState.decode(self.redis.hget(keys.job_hash(job_id), "state"))

    @staticmethod
    def queue_state(pipe, job_id: str) -> None:
        """Ask for the job's state on the caller's pipeline; JobState.decode reads the answer."""
        pipe.hget(keys.job_hash(job_id), "state")

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(keys.job_hash(job_id)))

    def header(self, job_id: str) -> JobHeader:
        raw = self.redis.hgetall(keys.job_hash(job_id))
        if not raw:
            raise JobNotFound(f"no job {job_id!r} in Redis")
        return JobHeader.parse(job_id, raw)

    def headers(self, job_ids: list[str]) -> list[JobHeader | None]:
        """Many jobs' headers in one round trip; None for a job Redis no longer knows."""
        with self.redis.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hgetall(keys.job_hash(job_id))
            rows = pipe.execute()
        return [JobHeader.parse(j, raw) if raw else None for j, raw in zip(job_ids, rows)]

    def listing(self, user: str | None, *, offset: int = 0, limit: int = 50,
                state: JobState | None = None) -> list[JobHeader]:
        """Jobs newest first: one user's, or everyone's for None. Ids whose state has expired
        are dropped from the index on the way."""
        index = keys.user_jobs(user) if user is not None else keys.JOBS_INDEX
        found: list[JobHeader] = []
        start = 0
        while len(found) < offset + limit:
            ids = [j.decode() for j in self.redis.zrevrange(index, start, start + 199)]
            if not ids:
                break
            start += len(ids)
            headers = self.headers(ids)
            gone = [j for j, h in zip(ids, headers) if h is None]
            if gone:
                self.redis.zrem(index, *gone)
                start -= len(gone)
            found += [h for h in headers if h is not None and (state is None or h.state is state)]
        return found[offset:offset + limit]

    def waiting_items(self, user: str) -> int:
        """Items of the user's unfinished jobs (queued, running or paused) not yet done or failed."""
        ids = [j.decode() for j in self.redis.zrange(keys.user_jobs(user), 0, -1)]
        return sum(h.total - h.done - h.failed for h in self.headers(ids) if h is not None and not h.finished)

    def queue_position(self, header: JobHeader) -> int | None:
        """How many runnable jobs of its lane go before this one (higher priority, or the same
        priority and older); None for a job that is not runnable. Fair share may still serve
        another user's job first: this is the order within the lane, not a promise."""
        if not header.state.runnable:
            return None
        ids = [j.decode() for j in self.redis.zrange(keys.lane_jobs(header.lane), 0, -1)]
        ahead = 0
        for other in self.headers(ids):
            if other is None or other.job_id == header.job_id or not other.state.runnable:
                continue
            if (-other.priority, other.created) < (-header.priority, header.created):
                ahead += 1
        return ahead

    def running_counts(self, job_ids: list[str]) -> list[int]:
        """Items in chunks being rendered, per job, in one round trip."""
        with self.redis.pipeline() as pipe:
            for job_id in job_ids:
                pipe.hvals(keys.running(job_id))
            rows = pipe.execute()
        return [sum(json.loads(r)["items"] for r in job_rows) for job_rows in rows]

    def status(self, job_id: str) -> JobStatus:
        with self.redis.pipeline() as pipe:
            pipe.hgetall(keys.job_hash(job_id))
            pipe.hvals(keys.running(job_id))
            pipe.hgetall(keys.failures(job_id))
            data, running, failures = pipe.execute()
        if not data:
            raise JobNotFound(f"no job {job_id!r} in Redis")
        header = JobHeader.parse(job_id, data)
        running_rows = [json.loads(r) for r in running]
        # A worker counts its items done a round trip before it clears the chunk's running
        # row, so a row may still be there for items already counted: never count past the end.
        left = max(0, header.total - header.done - header.failed)
        running_items = min(left, sum(r["items"] for r in running_rows))
        return JobStatus(
            **vars(header),
            running=running_items,
            failures={int(k): v.decode() for k, v in failures.items()},
            workers=sorted({r["worker"] for r in running_rows}),
            partial=min(running_items, sum(r.get("items", 0) * r.get("fraction", 0.0) for r in running_rows)),
        )

    # --- chunks and items ----------------------------------------------------------------

    def start_chunk(self, job_id: str, chunk: int, worker: str, items: int) -> ChunkStart:
        """In one round trip: the job's state, and if it is runnable, the chunk marked running
        (and the job too). A paused, cancelled, finished or unknown job's chunk is not marked."""
        state, delivery = self._start(keys=[keys.job_hash(job_id), keys.running(job_id), keys.deliveries(job_id)],
                                      args=[chunk, json.dumps({"worker": worker, "items": items,
                                                               "since": time.time()}), time.time()])
        return ChunkStart(JobState.decode(state) if state else None, int(delivery))

    def set_running(self, job_id: str, chunk: int, row: dict, pipe=None) -> None:
        """A running chunk's row {worker, items, since, fraction}."""
        (pipe or self.redis).hset(keys.running(job_id), chunk, json.dumps(row))

    def clear_running(self, job_id: str, chunk: int, pipe=None) -> None:
        """The chunk no longer runs (finished, handed back, or its worker gone)."""
        (pipe or self.redis).hdel(keys.running(job_id), chunk)

    def hand_back(self, job_id: str, *numbers: int, pipe=None) -> None:
        """Chunks to hand out again before new ones (a dead worker's, a paused job's, a lost one)."""
        (pipe or self.redis).rpush(keys.handed_back(job_id), *numbers)

    def count_attempt(self, job_id: str, chunk: int) -> int:
        """One more transient failure of the chunk; returns how many it has had."""
        return int(self.redis.hincrby(keys.attempts(job_id), chunk, 1))

    def take_handed_back(self, job_id: str) -> int | None:
        """The next chunk handed back, taken off the list; None when there is none."""
        number = self.redis.lpop(keys.handed_back(job_id))
        return None if number is None else int(number)

    def taken(self, job_id: str) -> dict[int, int]:
        """Model group -> how many of its chunks the feeder has handed out."""
        return {int(g): int(n) for g, n in self.redis.hgetall(keys.cursors(job_id)).items()}

    def take(self, job_id: str, group: int) -> int:
        """The ordinal of the group's next chunk to hand out, counted as handed out."""
        return self.redis.hincrby(keys.cursors(job_id), group, 1) - 1

    def all_settled(self, job_id: str, indexes: range | list[int]) -> bool:
        """True when every one of these items is already done or failed."""
        with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.getbit(keys.done_bits(job_id), index)
                pipe.getbit(keys.failed_bits(job_id), index)
            bits = pipe.execute()
        return all(a or b for a, b in zip(bits[::2], bits[1::2]))

    def unsettled(self, job_id: str, total: int) -> list[int]:
        """Indexes below `total` neither done nor failed, from both bitmaps in one round trip."""
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.done_bits(job_id))
            pipe.get(keys.failed_bits(job_id))
            done, failed = pipe.execute()
        return unsettled(done, failed, total)

    def done_among(self, job_id: str, indexes: list[int]) -> set[int]:
        with self.redis.pipeline(transaction=False) as pipe:
            for index in indexes:
                pipe.getbit(keys.done_bits(job_id), index)
            return {i for i, bit in zip(indexes, pipe.execute()) if bit}

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
            keys=[keys.job_hash(job_id), bits, other_bits, keys.ITEM_STATS],
            args=[counter, other, time.time(), *indexes]
        )
        return bool(completed)

    def deliveries(self, job_id: str) -> dict[int, int]:
        """How many times each started chunk was started."""
        return {int(k): int(v) for k, v in self.redis.hgetall(keys.deliveries(job_id)).items()}
