"""One way to reach Redis: `connect()`, with the farm's timeouts, raising the farm's own errors.

Every process (CLI, dispatcher, worker, tests) takes its client from here, so a
Redis that is away or refuses our password reads the same everywhere, as arq's
`connections.py` does it:

    redis.AuthenticationError            -> BrokerAccessDenied (permanent: fix the URL)
    redis.ConnectionError, TimeoutError  -> BrokerUnavailable  (retriable: it may come back)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import redis
from redis.client import Pipeline

from farm.errors import BrokerAccessDenied, BrokerUnavailable
from farm.settings import Settings

#: Seconds to wait for a TCP connection: a Redis that does not accept one in this time is away.
CONNECT_TIMEOUT = 5.0
#: Seconds between PINGs on a connection that sat idle, so a dropped one is noticed before a
#: command is lost on it (a worker can render for minutes between two commands).
HEALTH_CHECK_INTERVAL = 30


@contextmanager
def translated() -> Iterator[None]:
    """redis-py's connection errors as the farm's own. Other Redis errors pass unchanged."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise BrokerAccessDenied(f"Redis refused the credentials: {e}") from e
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise BrokerUnavailable(f"Redis did not answer: {e}") from e


class _Pipeline(Pipeline):
    def execute(self, raise_on_error: bool = True):
        with translated():
            return super().execute(raise_on_error)

    def immediate_execute_command(self, *args, **options):
        with translated():
            return super().immediate_execute_command(*args, **options)


class FarmRedis(redis.Redis):
    """A redis-py client whose commands, pipelines and scripts raise the farm's errors."""

    def execute_command(self, *args, **options):
        with translated():
            return super().execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint=None) -> Pipeline:
        return _Pipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


def connect(target: Settings | str, *, socket_timeout: float | None = None,
            connect_timeout: float = CONNECT_TIMEOUT) -> FarmRedis:
    """A client for the settings' job-state Redis (or a Redis URL). `socket_timeout` bounds each
    reply; a caller that blocks on Redis (BLPOP) passes one longer than its block."""
    url = target.require_state() if isinstance(target, Settings) else target
    return FarmRedis.from_url(url, socket_connect_timeout=connect_timeout, socket_timeout=socket_timeout,
                              health_check_interval=HEALTH_CHECK_INTERVAL)
