"""Keep the leases of the messages a worker holds, so a long chunk is never delivered twice.

kombu's Redis transport records each delivered, unacked message in the sorted set
`unacked_index`, scored by delivery time; any consumer re-queues entries older than
the visibility timeout. This thread runs in the Celery parent process, which holds
the messages (the forked child that renders never sees their delivery tags), and
moves the score of every message it holds to now, every third of the timeout.
When the worker dies, the renewals stop, and its messages come back to the queue
one timeout later.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from celery.worker import state

from farm import pool
from farm.errors import BrokerUnavailable

log = logging.getLogger(__name__)

UNACKED_INDEX = "unacked_index"


def _held_requests() -> list:
    for _ in range(3):
        try:
            return list(state.reserved_requests) + list(state.active_requests)
        except RuntimeError:  # the sets changed while we copied them
            continue
    return []


def held_delivery_tags() -> list[str]:
    """Delivery tags of the messages this worker process has reserved or is running."""
    tags = {getattr(getattr(r, "message", None), "delivery_tag", None) for r in _held_requests()}
    return [t for t in tags if t]


def held_chunks() -> list[str]:
    """`<job>/<chunk>` of every chunk this worker has taken from its queue and not finished."""
    held = {pool.assignment_of(getattr(request, "kwargs", None)) for request in _held_requests()}
    return sorted(h for h in held if h)


class LeaseKeeper:
    """Renews message leases (Redis brokers; RabbitMQ needs none) and beats the worker's
    heartbeat, with the chunks it holds, every `interval` seconds."""

    def __init__(self, client: redis.Redis, interval: float, worker: str | None = None, entry: str | None = None,
                 leases: bool = True):
        self.client = client
        self.leases = leases
        self.interval = interval
        self.worker = worker
        self.entry = entry
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-lease", daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def renew(self) -> int:
        tags = held_delivery_tags()
        if not tags:
            return 0
        now = time.time()
        # XX: only move entries still there; once acked or restored they stay gone.
        self.client.zadd(UNACKED_INDEX, {tag: now for tag in tags}, xx=True)
        self.renewals += len(tags)
        return len(tags)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                if self.worker:
                    pool.heartbeat(self.client, self.worker, self.entry, held_chunks())
                if self.leases:
                    self.renew()
            except (redis.RedisError, BrokerUnavailable) as e:
                log.warning("could not renew message leases: %s", e)
