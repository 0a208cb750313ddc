"""Keep the lease of the message being rendered, so a long chunk is never delivered twice.

kombu's Redis transport records each delivered, unacked message in the sorted set
`unacked_index`, scored by delivery time; any consumer re-queues entries older than
the visibility timeout. While a chunk renders, this thread moves its score to now,
every third of the timeout. If the worker's parent process dies, the thread stops
renewing, and the message comes back to the queue one timeout later.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis

log = logging.getLogger(__name__)

UNACKED_INDEX = "unacked_index"


class LeaseKeeper:
    def __init__(self, client: redis.Redis, delivery_tag: str | None, interval: float):
        self.client = client
        self.tag = delivery_tag
        self.interval = interval
        self._stop = threading.Event()
        self._parent = os.getppid()
        self._thread = threading.Thread(target=self._run, name="farm-lease", daemon=True)
        self.renewals = 0

    def __enter__(self) -> "LeaseKeeper":
        if self.tag:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if os.getppid() != self._parent:
                log.warning("worker parent died; no longer renewing the lease of %s", self.tag)
                return
            try:
                # XX: only move an entry that is still there; once acked or restored it stays gone.
                self.client.zadd(UNACKED_INDEX, {self.tag: time.time()}, xx=True)
                self.renewals += 1
            except redis.RedisError as e:
                log.warning("could not renew the lease of %s: %s", self.tag, e)
