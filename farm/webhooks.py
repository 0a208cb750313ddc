"""Webhooks: a job's summary POSTed to its `webhook` URL when it ends (and each stored image's
record with `webhook_each`), signed, retried with backoff, delivered at most once.

A delivery is queued in Redis (`keys.webhook(id)`, due times in `keys.WEBHOOKS_DUE`) by
whoever ends the job, and carried by the `Courier` in every running dispatcher. A delivery id
is made from the job and the event, and queueing an id that exists does nothing: a job's end
is posted once however many processes see it end.

Each POST carries `X-Farm-Signature: sha256=<hex>`, the HMAC-SHA256 of the body under the
deployment's `FARM_WEBHOOK_SECRET`, and `X-Farm-Delivery: <id>`, the same on every retry, so a
receiver that saw a delivery succeed but could not answer in time can drop the repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request

import redis

from farm import __version__, keys
from farm.errors import BrokerUnavailable

log = logging.getLogger(__name__)

#: Retries stop this long after the first try.
GIVE_UP_AFTER = 600.0
#: A claimed delivery goes back to the queue if its courier has not settled it by then.
LEASE = 60.0
#: Kept this long after it settled, so the same id is not queued again.
KEEP = 7 * 24 * 3600

# KEYS: delivery hash, due set. ARGV: id, url, body, now. Returns 1 when queued, 0 when known.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'url', ARGV[2], 'body', ARGV[3], 'first', ARGV[4], 'attempts', 0)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

# KEYS: due set. ARGV: id, now, lease end. Returns 1 when this caller now holds the delivery.
_CLAIM = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def job_ended_id(job_id: str) -> str:
    return f"{job_id}:ended"


def item_stored_id(job_id: str, index: int) -> str:
    return f"{job_id}:item:{index}"


def enqueue(client, delivery_id: str, url: str, payload: dict) -> None:
    """Queue one POST of `payload` to `url`; nothing when `delivery_id` was queued before.
    `client` may be a pipeline."""
    body = json.dumps(payload, sort_keys=True, ensure_ascii=False)
    client.eval(_ENQUEUE, 2, keys.webhook(delivery_id), keys.WEBHOOKS_DUE,
                delivery_id, url, body, time.time(), KEEP)


def backoff(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: 1, 2, 4, ... at most 60."""
    return min(60.0, 2.0 ** max(0, attempts - 1))


class Courier:
    """Carries due deliveries. Safe to run in several dispatchers: each delivery is claimed."""

    def __init__(self, client: redis.Redis, secret: str, *, timeout: float = 10.0,
                 give_up_after: float = GIVE_UP_AFTER):
        self.redis, self.secret, self.timeout, self.give_up_after = client, secret, timeout, give_up_after

    def run_once(self) -> int:
        """Try every delivery that is due; returns how many were tried."""
        now = time.time()
        tried = 0
        for raw in self.redis.zrangebyscore(keys.WEBHOOKS_DUE, 0, now, start=0, num=50):
            delivery_id = raw.decode()
            if self.redis.eval(_CLAIM, 1, keys.WEBHOOKS_DUE, delivery_id, now, now + LEASE):
                self._try(delivery_id)
                tried += 1
        return tried

    def _try(self, delivery_id: str) -> None:
        row = {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.webhook(delivery_id)).items()}
        if not row:
            self.redis.zrem(keys.WEBHOOKS_DUE, delivery_id)
            return
        attempts = int(row["attempts"]) + 1
        error = self._post(row["url"], row["body"].encode(), delivery_id)
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.hset(keys.webhook(delivery_id), mapping={"attempts": attempts, "last_error": error or ""})
            if error is None:
                pipe.hset(keys.webhook(delivery_id), "delivered", now)
                pipe.zrem(keys.WEBHOOKS_DUE, delivery_id)
            elif now - float(row["first"]) + backoff(attempts) > self.give_up_after:
                pipe.hset(keys.webhook(delivery_id), "gave_up", now)
                pipe.zrem(keys.WEBHOOKS_DUE, delivery_id)
                log.warning("webhook %s: gave up after %d tries: %s", delivery_id, attempts, error)
            else:
                pipe.zadd(keys.WEBHOOKS_DUE, {delivery_id: now + backoff(attempts)})
            pipe.execute()

    def _post(self, url: str, body: bytes, delivery_id: str) -> str | None:
        """None when the receiver answered 2xx; else why not."""
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": f"farm/{__version__}",
            "X-Farm-Signature": sign(self.secret, body), "X-Farm-Delivery": delivery_id,
        })
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                answer.read(1024)
                return None
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, ValueError) as e:
            return str(getattr(e, "reason", e))

    def run(self, stop: threading.Event, tick: float = 1.0) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except (redis.RedisError, BrokerUnavailable) as e:
                log.warning("webhooks: Redis did not answer (%s)", e)
            except Exception:  # noqa: BLE001 - a bad delivery must not stop the courier
                log.exception("webhook round failed")
            stop.wait(tick)


def delivery(client: redis.Redis, delivery_id: str) -> dict:
    """A delivery's record: url, attempts, delivered or gave_up (epoch seconds), last_error."""
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.webhook(delivery_id)).items()}
