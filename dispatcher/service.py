"""`farm dispatcher`: the loop that runs the feeder.

It tops up every worker's window when woken (a worker finished a chunk, a job was
submitted, resumed or re-prioritised) and at least once a tick, which is also when
dead workers are noticed. It keeps no state of its own: kill it and start another,
and it carries on from Redis. Two running at once are safe (the feeder takes a lock).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from dispatcher import exports
from dispatcher.feeder import Feeder
from farm import keys, webhooks
from farm.celery_app import make_celery
from farm.connections import connect
from farm.errors import BrokerUnavailable
from farm.settings import Settings

log = logging.getLogger(__name__)

#: Seconds between rounds when nothing wakes the dispatcher.
TICK = 1.0


def serve(settings: Settings, stop: threading.Event | None = None, tick: float = TICK) -> None:
    stop = stop or threading.Event()
    # Replies wait at most the BLPOP's block and a margin; a longer silence is a Redis away.
    client = connect(settings, socket_timeout=tick + 10)
    if settings.webhook_secret:
        # Its own thread: a slow receiver must not hold up the feeder.
        courier = webhooks.Courier(connect(settings, socket_timeout=30), settings.webhook_secret)
        threading.Thread(target=courier.run, args=(stop,), name="farm-webhooks", daemon=True).start()
    exports.start_in_thread(connect(settings, socket_timeout=30), settings, stop)
    feeder = Feeder(client, make_celery(settings), settings)
    me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
    delay = 0.5
    while not stop.is_set():
        try:
            client.set(keys.DISPATCHER, me, ex=max(10, int(5 * tick)))
            sent = feeder.top_up()
            if sent:
                log.debug("sent %d chunks", sent)
            # Wait for a wake-up, then swallow the rest: one round serves them all.
            if client.blpop([keys.FEEDER_WAKE], timeout=tick):
                client.delete(keys.FEEDER_WAKE)
            delay = 0.5
        except BrokerUnavailable as e:
            if stop.is_set():
                break  # stopping with Redis: not a fault
            log.warning("Redis did not answer (%s); retrying in %.1fs", e, delay)
            stop.wait(delay)
            delay = min(delay * 2, 10.0)
        except Exception:  # noqa: BLE001 - one bad job must not stop the pool
            log.exception("feeder round failed")
            stop.wait(tick)


def start_in_thread(settings: Settings) -> tuple[threading.Thread, threading.Event]:
    """A dispatcher inside this process (`farm run`), stopped by setting the event."""
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop), name="farm-dispatcher", daemon=True)
    thread.start()
    return thread, stop


def is_running(client) -> bool:
    return bool(client.exists(keys.DISPATCHER))
