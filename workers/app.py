"""The Celery app that workers run: `celery -A workers.app worker -P prefork -c 1`.

`farm worker` starts one such process per GPU (workers/supervisor.py).
"""

from __future__ import annotations

import logging
import os
import socket

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from farm import keys, pool
from farm.celery_app import make_celery, purge_queue
from farm.connections import connect
from farm.errors import BrokerAccessDenied, BrokerUnavailable
from farm.settings import Settings
from workers.lease import LeaseKeeper

log = logging.getLogger(__name__)

settings = Settings.from_env()
app = make_celery(settings)


@worker_process_init.connect
def _init_process(**_) -> None:
    # torch, diffusers and the models load here, in the rendering process, never in the parent:
    # CUDA cannot be used after a fork, and the parent's start-up is not held up meanwhile.
    from workers import runtime

    runtime.init(settings).preload()


_lease: LeaseKeeper | None = None


@worker_ready.connect
def _announce(sender=None, **_) -> None:
    global _lease
    client = connect(settings)
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") or "none"
    entry = pool.register(client, sender.hostname, keys.worker_queue(settings.queue, sender.hostname),
                          socket.gethostname(), gpu)
    _lease = LeaseKeeper(client, settings.lease_renew_interval, sender.hostname, entry,
                         leases=settings.broker_is_redis).start()
    pool.wake(client, sender.hostname)


@worker_shutdown.connect
def _retire(sender=None, **_) -> None:
    """A clean stop (the current chunk is finished by then): hand back the chunk queued next."""
    if _lease:
        _lease.stop()
    try:
        client = connect(settings, connect_timeout=2)
        queue = keys.worker_queue(settings.queue, sender.hostname)
        pool.release(client, sender.hostname, queue)
        if not settings.broker_is_redis:
            purge_queue(sender.app, queue)
    except (BrokerUnavailable, BrokerAccessDenied) as e:
        log.warning("could not hand back this worker's chunks: %s", e)


@app.task(name=keys.RENDER_TASK, bind=True)
def render_chunk(self, **message) -> int:
    from workers import runtime
    from workers.tasks import run_chunk

    outputs = run_chunk(runtime.current(), message, worker=self.request.hostname or socket.gethostname())
    return len(outputs)
