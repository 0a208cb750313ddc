"""The feeder: keeps a short window of chunks ahead of each worker and decides what runs next.

Each worker consumes its own broker queue. The feeder keeps at most `depth` chunks
assigned to a worker (the one it renders and the next), so the broker never holds
more than a few messages and priorities, pauses and cancels take effect at once.

What goes next to a worker with a free slot:
1. the lane: every runnable `interactive` job before any `batch` one;
2. the priority: higher first;
3. fair share: among the users at that lane and priority, the one charged the fewest
   GPU-seconds (farm/fairshare.py: charged when sent, settled by the worker);
4. the user's oldest job;
5. within the job: chunks handed back first, then a chunk of a model the worker holds,
   then of a model no other worker holds or is about to load, then of the model with
   the most chunks left. Models are loaded as few times as the work allows.

All state is in Redis (cursors per model group, handed-back chunks, assignments per
worker), so any dispatcher can run this, and one that restarts carries on. A Redis
lock keeps two dispatchers from topping up at once.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, fields

import redis

from farm import celery_app, fairshare, keys, pool
from farm.jobs import JobBoard, JobHeader
from farm.message import RenderMessage
from farm.plan import Plan
from farm.pool import WorkerView
from farm.settings import Settings
from farm.store import Store, open_store

log = logging.getLogger(__name__)

#: How many heartbeats a worker may miss before its chunks are handed to others.
MISSED_HEARTBEATS = 3
#: How long the feeder lock outlives a dispatcher killed in the middle of a round (a round
#: takes milliseconds); the next dispatcher waits this long at most.
LOCK_MS = 5_000
#: A job with nothing left to hand out, yet unfinished and with nothing assigned, is
#: checked for lost chunks (a message lost with the broker, a dispatcher killed between
#: two steps) at most this often.
SWEEP_INTERVAL = 5.0


@dataclass
class JobView(JobHeader):
    """A job as one feeder round sees it: its header, and what this round learnt of it."""

    #: Nothing left to hand out this round.
    exhausted: bool = False
    #: Chunks assigned to live workers.
    assigned: int = 0

    @classmethod
    def of(cls, header: JobHeader, assigned: int) -> "JobView":
        return cls(**{f.name: getattr(header, f.name) for f in fields(JobHeader)}, assigned=assigned)

    @property
    def rank(self) -> tuple[int, int]:
        return keys.LANES.index(self.lane), -self.priority


def load_plan(store: Store, job_id: str) -> Plan:
    """A job's plan, rebuilt from the job.json written at submission."""
    return Plan.from_job_json(json.loads(store.get(keys.job_json(job_id))), job_id)


class Feeder:
    def __init__(self, client: redis.Redis, app, settings: Settings, depth: int = pool.WINDOW):
        self.redis = client
        self.board = JobBoard(client)
        self.app = app
        self.settings = settings
        self.queue = settings.queue
        self.depth = depth
        #: A worker whose heartbeat is older than this is dead.
        self.dead_after = MISSED_HEARTBEATS * settings.lease_renew_interval + 2.0
        self._swept: dict[str, float] = {}
        #: Since when this feeder has run without a gap: after a gap (Redis away, the process
        #: stopped) every heartbeat looks old, so nobody is taken for dead until a full
        #: `dead_after` of rounds has passed again.
        self.running_since = 0.0
        self._last_round = 0.0
        self._plans: dict[str, Plan] = {}
        self._stores: dict[str, Store] = {}

    def plan(self, job: "JobView") -> Plan:
        if job.job_id not in self._plans:
            if job.store not in self._stores:
                self._stores[job.store] = open_store(job.store, self.settings)
            while len(self._plans) >= 64:
                self._plans.pop(next(iter(self._plans)))
            self._plans[job.job_id] = load_plan(self._stores[job.store], job.job_id)
        return self._plans[job.job_id]

    # --- one round ---------------------------------------------------------------------

    def top_up(self) -> int:
        """Reclaim dead workers' chunks, then fill every live worker's window. Returns chunks sent."""
        token = uuid.uuid4().hex
        if not self.redis.set(keys.FEEDER_LOCK, token, nx=True, px=LOCK_MS):
            return 0
        try:
            workers = pool.read(self.redis, self.queue)
            now = time.time()
            if now - self._last_round > 5.0:
                self.running_since = now
            self._last_round = now
            live = [w for w in workers if now - w.heartbeat <= self.dead_after]
            if now - self.running_since >= self.dead_after:
                for dead in (w for w in workers if now - w.heartbeat > self.dead_after):
                    self._reclaim(dead)
                for worker in live:
                    self._reconcile(worker, now)
            jobs = self._jobs(live)
            return self._fill(live, jobs)
        finally:
            # Release only our own lock (it may have expired and been taken).
            self.redis.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end "
                            "return 0", 1, keys.FEEDER_LOCK, token)

    def _fill(self, live: list[WorkerView], jobs: list[JobView]) -> int:
        sent = 0
        progress = True
        # One slot per worker per pass, so workers are served evenly.
        while progress:
            progress = False
            for worker in sorted(live, key=lambda w: len(w.assigned)):
                if len(worker.assigned) >= self.depth or worker.draining:
                    continue
                picked = self._pick(worker, jobs, live)
                if picked is None:
                    continue
                self._send(worker, *picked)
                sent += 1
                progress = True
        return sent

    # --- reading state -------------------------------------------------------------------

    def _jobs(self, live: list[WorkerView]) -> list[JobView]:
        ids = [(lane, j.decode()) for lane in keys.LANES for j in self.redis.zrange(keys.lane_jobs(lane), 0, -1)]
        headers = self.board.headers([job_id for _, job_id in ids])
        in_flight: dict[str, int] = {}
        for worker in live:
            for key in worker.assigned:
                job_id = key.rsplit("/", 1)[0]
                in_flight[job_id] = in_flight.get(job_id, 0) + 1
        jobs = []
        for (lane, job_id), header in zip(ids, headers):
            if header is None or header.finished:
                self.redis.zrem(keys.lane_jobs(lane), job_id)
                continue
            jobs.append(JobView.of(header, in_flight.get(job_id, 0)))
        return jobs

    # --- choosing ------------------------------------------------------------------------

    def _pick(self, worker: WorkerView, jobs: list[JobView], live: list[WorkerView]):
        while True:
            candidates = [j for j in jobs if j.state.runnable and not j.exhausted]
            if not candidates:
                return None
            best = min(j.rank for j in candidates)
            level = [j for j in candidates if j.rank == best]
            oldest = {u: min(j.created for j in level if j.user == u) for u in {j.user for j in level}}
            user = fairshare.choose_user(self.redis, level[0].lane, oldest)
            job = min((j for j in level if j.user == user), key=lambda j: j.created)
            number = self._next_chunk(job, worker, live)
            if number is not None:
                return job, number
            job.exhausted = True
            self._sweep(job)

    def _next_chunk(self, job: JobView, worker: WorkerView, live: list[WorkerView]) -> int | None:
        plan = self.plan(job)
        while (back := self.board.take_handed_back(job.job_id)) is not None:
            if not self.board.all_settled(job.job_id, plan.chunk_range(back)):
                return back
        taken = self.board.taken(job.job_id)
        left = {g: plan.group_chunk_count(g) - taken.get(g, 0) for g in range(len(plan.models))}
        left = {g: n for g, n in left.items() if n > 0}
        if not left:
            return None
        held = worker.will_hold()
        elsewhere = set().union(*(w.will_hold() for w in live if w.name != worker.name))
        order = sorted(left, key=lambda g: (plan.models[g] not in held, plan.models[g] in elsewhere, -left[g], g))
        for group in order:
            # Skip chunks already stored (a job rebuilt after a crash), a bounded number per call.
            for _ in range(10_000):
                ordinal = self.board.take(job.job_id, group)
                if ordinal >= plan.group_chunk_count(group):
                    break
                number = plan.group_chunk(group, ordinal)
                if not self.board.all_settled(job.job_id, plan.chunk_range(number)):
                    return number
            else:
                return None
        return None

    # --- acting --------------------------------------------------------------------------

    def _send(self, worker: WorkerView, job: JobView, number: int) -> None:
        chunk = self.plan(job).chunk(number)
        # Recorded before it is sent: a chunk is never in a queue without an owner to reclaim
        # it from. A crash between the two leaves an assignment with no message, which
        # _reconcile hands back a few heartbeats later.
        assignment = {"model": chunk.items[0].model, "items": len(chunk.items), "at": time.time()}
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.worker_assigned(worker.name), keys.assignment(job.job_id, number), json.dumps(assignment))
            charged = fairshare.charge(pipe, job.lane, job.user, len(chunk.items), job.seconds_per_item)
            pipe.execute()
        message = RenderMessage(chunk, job.store, charged)
        self.app.send_task(keys.RENDER_TASK, kwargs=message.to_kwargs(), queue=worker.queue)
        worker.assigned[keys.assignment(job.job_id, number)] = assignment
        job.assigned += 1

    def _reclaim(self, dead: WorkerView) -> None:
        count = pool.release(self.redis, dead)
        if not self.settings.broker_is_redis:
            celery_app.purge_queue(self.app, dead.queue)
        log.warning("worker %s missed its heartbeats; handed back %d chunks", dead.name, count)

    def _reconcile(self, worker: WorkerView, now: float) -> None:
        """Drop assignments whose message never reached the worker (a dispatcher killed between
        recording a chunk and sending it, a message lost with the broker): not in its queue, not
        held at its last heartbeat, and older than a few heartbeats. Their chunks are handed back."""
        old = [k for k, a in worker.assigned.items() if now - a.get("at", now) > self.dead_after]
        if not old:
            return
        if self.settings.broker_is_redis:
            queued = pool.queued_chunks(self.redis, worker.queue)
        elif celery_app.queue_depth(self.app, worker.queue) == 0:
            queued = set()  # RabbitMQ: everything sent was taken, and what was taken is `holding`
        else:
            return
        lost = [k for k in old if k not in queued and k not in worker.holding]
        for key in lost:
            with self.redis.pipeline() as pipe:
                pool.hand_back(self.board, pipe, worker.name, key)
                pipe.execute()
            del worker.assigned[key]
            log.warning("chunk %s was assigned to %s but never reached it; handed back", key, worker.name)

    def _sweep(self, job: JobView) -> None:
        """A job with nothing left to hand out and nothing assigned, yet unfinished, lost chunks on
        the way (a message lost with the broker, a crash between two steps): hand them back."""
        if job.assigned or time.time() - self._swept.get(job.job_id, 0) < SWEEP_INTERVAL:
            return
        self._swept[job.job_id] = time.time()
        plan = self.plan(job)
        missing = {plan.chunk_of(i) for i in self.board.unsettled(job.job_id, plan.item_count)}
        if missing:
            log.warning("job %s: %d chunks were lost on the way; handing them out again", job.job_id, len(missing))
            self.board.hand_back(job.job_id, *sorted(missing))
            job.exhausted = False
