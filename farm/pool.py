"""The worker registry: who is in the pool, what each holds and does, and what it was given.

Workers write it (a heartbeat from the Celery parent, the rest from the rendering
process); the feeder reads it to route chunks and to hand back a dead worker's
chunks; `farm workers` prints it.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field

import redis

from farm import keys
from farm.jobs import JobBoard

#: Chunks assigned to one worker at a time: the one it renders and the next, which it has
#: already taken from its queue (Celery's prefetch is the same number), so it never waits
#: on the feeder or the broker between chunks.
WINDOW = 2


@dataclass
class WorkerView:
    name: str
    queue: str
    host: str = ""
    gpu: str = ""
    since: float = 0.0
    heartbeat: float = 0.0
    device: str = ""
    models: list[str] = field(default_factory=list)
    loads: int = 0
    images: int = 0
    images_per_minute: float = 0.0
    #: {job, chunk, items, step, steps} while rendering, else None.
    current: dict | None = None
    assigned: dict[str, dict] = field(default_factory=dict)
    #: `<job>/<chunk>` the worker had taken from its queue at its last heartbeat.
    holding: list[str] = field(default_factory=list)
    #: Going away (`farm drain`, a pod's preStop): it gets no new chunk.
    draining: bool = False

    def summary(self, now: float) -> dict:
        """Plain JSON values: `farm workers --json` and `GET /v1/workers`."""
        return {
            "worker": self.name, "host": self.host, "gpu": self.gpu, "device": self.device, "models": self.models,
            "model_loads": self.loads, "current": self.current, "images": self.images,
            "images_per_minute": self.images_per_minute, "heartbeat_seconds_ago": round(now - self.heartbeat, 1),
            "assigned": len(self.assigned),
        }

    def will_hold(self) -> set[str]:
        """Models this worker holds or will load for the chunks it has been given."""
        return set(self.models) | {a["model"] for a in self.assigned.values()}


def register(client: redis.Redis, name: str, queue: str, host: str, gpu: str) -> str:
    """Enter the pool; returns the entry, which each heartbeat puts back if it went missing."""
    now = time.time()
    entry = json.dumps({"host": host, "gpu": gpu, "since": now, "queue": queue})
    with client.pipeline() as pipe:
        pipe.hset(keys.WORKERS, name, entry)
        pipe.hset(keys.worker_live(name), mapping={"heartbeat": now})
        # A worker that starts again under the name of a drained one takes work again.
        pipe.hdel(keys.worker_live(name), "draining")
        pipe.execute()
    return entry


def heartbeat(client: redis.Redis, name: str, entry: str | None = None, holding: list[str] | None = None) -> None:
    """A live worker says so, and which chunks it has taken from its queue. With its entry, it
    also re-enters a pool that forgot it (Redis lost its data, or the feeder took it for dead
    while Redis was away)."""
    with client.pipeline() as pipe:
        pipe.hset(keys.worker_live(name), mapping={"heartbeat": time.time(), "holding": json.dumps(holding or [])})
        if entry:
            pipe.hsetnx(keys.WORKERS, name, entry)
        pipe.execute()


def drain(client: redis.Redis, names: list[str]) -> None:
    """Give these workers no new chunk: they are about to stop (scale-in, maintenance)."""
    for name in names:
        publish(client, name, draining=True)


def publish(client: redis.Redis, name: str, **fields) -> None:
    """Live fields of a worker (models, loads, current, images...); values are JSON-encoded.
    `client` may be the caller's pipeline."""
    client.hset(keys.worker_live(name), mapping={k: json.dumps(v) for k, v in fields.items()})


def read(client: redis.Redis, queue: str) -> list[WorkerView]:
    names = sorted(n.decode() for n in client.hkeys(keys.WORKERS))
    with client.pipeline() as pipe:
        for name in names:
            pipe.hget(keys.WORKERS, name)
            pipe.hgetall(keys.worker_live(name))
            pipe.hgetall(keys.worker_assigned(name))
        rows = pipe.execute()
    views = []
    for i, name in enumerate(names):
        info, live, assigned = rows[3 * i: 3 * i + 3]
        info = json.loads(info) if info else {}
        live = {k.decode(): v.decode() for k, v in live.items()}
        value = lambda key, default: json.loads(live[key]) if key in live else default  # noqa: E731
        views.append(WorkerView(
            name=name, queue=info.get("queue") or keys.worker_queue(queue, name), host=info.get("host", ""),
            gpu=info.get("gpu", ""), since=float(info.get("since", 0)), heartbeat=float(live.get("heartbeat", 0)),
            device=value("device", ""), models=value("models", []), loads=value("loads", 0),
            images=value("images", 0), images_per_minute=value("images_per_minute", 0.0),
            current=value("current", None), holding=value("holding", []), draining=value("draining", False),
            assigned={k.decode(): json.loads(v) for k, v in assigned.items()},
        ))
    return views


def release(client: redis.Redis, worker: WorkerView | str, queue: str | None = None) -> int:
    """Hand every chunk given to a worker back to its job and forget the worker.
    Used by the feeder for a worker that stopped beating, and by a worker shutting down."""
    name = worker if isinstance(worker, str) else worker.name
    worker_queue = queue or (worker.queue if isinstance(worker, WorkerView) else None)
    assigned = [k.decode() for k in client.hkeys(keys.worker_assigned(name))]
    board = JobBoard(client)
    with client.pipeline() as pipe:
        for key in assigned:
            hand_back(board, pipe, name, key)
            job_id, number = key.rsplit("/", 1)
            board.clear_running(job_id, int(number), pipe)
        pipe.delete(keys.worker_assigned(name), keys.worker_live(name))
        if worker_queue:
            pipe.delete(worker_queue)
        pipe.hdel(keys.WORKERS, name)
        wake(pipe, name)
        pipe.execute()
    return len(assigned)


def hand_back(board: JobBoard, pipe, name: str, assignment: str) -> None:
    """Take `<job>/<chunk>` from a worker and give it back to its job, to be handed out first,
    on the caller's pipeline."""
    job_id, number = assignment.rsplit("/", 1)
    pipe.hdel(keys.worker_assigned(name), assignment)
    board.hand_back(job_id, int(number), pipe=pipe)


def finished_chunk(client: redis.Redis, name: str, job_id: str, chunk: int) -> None:
    """The worker is done with a chunk (rendered, failed, dropped or handed back): its slot is
    free, and the feeder is woken to fill it. `client` may be the caller's pipeline."""
    client.hdel(keys.worker_assigned(name), keys.assignment(job_id, chunk))
    wake(client, name)


def wake(client: redis.Redis, reason: str = "") -> None:
    """Wake the feeder now instead of at its next tick: a slot is free, a job came or changed, a
    worker joined or left. `client` may be the caller's pipeline."""
    client.rpush(keys.FEEDER_WAKE, reason or "wake")


#: kombu's Redis transport: hash of delivered, unacknowledged messages.
UNACKED = "unacked"


def queued_chunks(client: redis.Redis, queue: str) -> set[str]:
    """`<job>/<chunk>` of the render messages waiting in a worker's queue, or delivered to any
    worker and not yet acknowledged (kombu's JSON envelopes)."""
    raws = client.lrange(queue, 0, -1)
    for raw in client.hvals(UNACKED):
        try:
            raws.append(json.dumps(json.loads(raw)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    return {chunk for chunk in map(_chunk_of, raws) if chunk}


def _chunk_of(raw: bytes | str) -> str | None:
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
    except (ValueError, KeyError, TypeError):
        return None  # not a render message of ours; the worker refuses it
    return assignment_of(kwargs)


def assignment_of(kwargs: object) -> str | None:
    """`<job>/<chunk>` of a render message's keyword arguments, or None if they are not one."""
    try:
        return keys.assignment(str(kwargs["job"]), int(kwargs["chunk"]))  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return None
