"""The Celery configuration shared by senders and workers.

Senders use `send_task` with the task's name, so they never import worker code.
"""

from __future__ import annotations

from celery import Celery

from farm import keys, pool
from farm.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("farm", broker=settings.require_broker(), set_as_current=False)
    app.conf.update(
        # Messages are JSON only: a pickled message is refused and never runs.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        # Progress and outcomes go to farm's own Redis keys and the store; Celery
        # results would only pile up (one key per task for a day).
        task_ignore_result=True,
        result_backend=None,
        # Ack after the chunk is stored, so a worker that dies mid-chunk loses nothing.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # Each worker has its own queue, and the feeder puts only its window of chunks in it:
        # taking the next while rendering one costs no other GPU anything, and saves the
        # fetch after every ack (7 ms a chunk here with a prefetch of 1).
        worker_prefetch_multiplier=pool.WINDOW,
        task_default_queue=settings.queue,
        task_routes={keys.RENDER_TASK: {"queue": settings.queue}},
        broker_connection_retry_on_startup=True,
        broker_transport_options=_transport_options(settings),
        worker_hijack_root_logger=False,
        # The rendering process is up once torch, diffusers and any preloaded model are loaded
        # (workers/app.py); Celery's default of 4 s would kill it for taking longer.
        worker_proc_alive_timeout=300,
        # Task events, so that `celery flower` (and celery-exporter) show the pool's tasks.
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


def _transport_options(settings: Settings) -> dict:
    if not settings.broker_is_redis:
        # RabbitMQ acknowledges late natively: an unacked message goes back when the consumer's
        # connection drops, and no lease is needed. Its consumer_timeout (30 min by default)
        # must exceed the longest chunk, or the broker closes the channel under a slow render.
        return {}
    return {
        # A message not acked within this many seconds goes back to the queue. Kept short so a
        # dead worker's chunk returns fast; a live worker renews the lease of the message it
        # renders (workers/lease.py), so a long chunk is never delivered twice.
        "visibility_timeout": settings.visibility_timeout,
        # kombu looks for expired messages only every 10 x 10 s by default (a killed worker's
        # task came back after 97 s); look every second.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }


def queue_depth(app: Celery, queue: str) -> int | None:
    """Messages waiting in an AMQP queue (not those delivered and unacked); None if unknown."""
    try:
        with app.connection_for_read() as conn:
            return conn.default_channel.queue_declare(queue, passive=True).message_count
    except Exception:  # noqa: BLE001 - a missing queue or a broker away: unknown, not an error here
        return None


def purge_queue(app: Celery, queue: str) -> None:
    """Drop what waits in a gone worker's AMQP queue: its chunks were handed to the others."""
    try:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)
    except Exception:  # noqa: BLE001 - no such queue: nothing to drop
        pass
