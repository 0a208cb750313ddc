"""Exports that a job's spec asks for (`[export]`), run by the dispatcher once the job has ended.

A job that ends is queued in `farm:exports` (JobBoard.close). A dispatcher takes it onto
`farm:exports:running`, holds a lock renewed while it writes, exports with `resume` (so an
export cut short by a restart carries on from its last finished shard), records the outcome in
the job's `export_state`, and lets it go. A dispatcher that starts takes back the running
exports whose lock has lapsed. It runs in its own thread: an export of a million images must
not hold up the feeder.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from farm import export, keys
from farm.errors import BrokerUnavailable, FarmError
from farm.jobs import JobBoard
from farm.settings import Settings
from farm.store import open_store
from farm.stored import StoredJob

log = logging.getLogger(__name__)

#: Seconds a dispatcher's claim on an export lasts without renewal.
LOCK_SECONDS = 60


class Exporter:
    def __init__(self, client: redis.Redis, settings: Settings):
        self.redis, self.board, self.settings = client, JobBoard(client), settings

    def run(self, stop: threading.Event) -> None:
        reclaimed = False
        while not stop.is_set():
            try:
                if not reclaimed:
                    self.reclaim()
                    reclaimed = True
                job_id = self.redis.blmove(keys.EXPORTS, keys.EXPORTS_RUNNING, 1.0, "LEFT", "RIGHT")
                if job_id:
                    self.export(job_id.decode())
            except (redis.RedisError, BrokerUnavailable) as e:
                if stop.is_set():
                    break  # stopping with Redis: not a fault
                log.warning("exports: Redis did not answer (%s)", e)
                stop.wait(2.0)

    def reclaim(self) -> None:
        """Requeue the running exports nobody holds (a dispatcher stopped in the middle of one)."""
        for raw in self.redis.lrange(keys.EXPORTS_RUNNING, 0, -1):
            job_id = raw.decode()
            if not self.redis.exists(keys.export_lock(job_id)) and self.redis.lrem(keys.EXPORTS_RUNNING, 1, raw):
                self.redis.rpush(keys.EXPORTS, job_id)

    def export(self, job_id: str) -> None:
        if not self.redis.set(keys.export_lock(job_id), "1", nx=True, ex=LOCK_SECONDS):
            return  # another dispatcher has it
        try:
            self.board.set_export_state(job_id, "running")
            outcome = self._write(job_id)
            log.info("job %s: export %s", job_id, outcome)
        except (FarmError, ValueError, OSError) as e:
            outcome = f"failed: {e}"
            log.warning("job %s: export failed: %s", job_id, e)
        finally:
            self.redis.lrem(keys.EXPORTS_RUNNING, 0, job_id)
            self.redis.delete(keys.export_lock(job_id))
        self.board.set_export_state(job_id, outcome)

    def _write(self, job_id: str) -> str:
        job = StoredJob(open_store(self.board.header(job_id).store, self.settings), job_id)
        spec = job.plan.spec.export
        renewed = [time.monotonic()]

        def renew(_count: int) -> None:
            if time.monotonic() - renewed[0] > LOCK_SECONDS / 3:
                self.redis.expire(keys.export_lock(job_id), LOCK_SECONDS)
                renewed[0] = time.monotonic()

        limit = export.parse_size(spec.shard_bytes) if spec.shard_bytes else None
        report = export.export(job, open_store(spec.dest, self.settings), spec.format,
                               shard_size=spec.shard_size, shard_bytes=limit, resume=True, on_row=renew)
        return f"done: {report.exported} images to {spec.dest} as {spec.format}"


def start_in_thread(client: redis.Redis, settings: Settings, stop: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=Exporter(client, settings).run, args=(stop,), name="farm-exports", daemon=True)
    thread.start()
    return thread
