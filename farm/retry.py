"""Retry with exponential backoff, for the retriable branch of errors only."""

from __future__ import annotations

import logging
import time
from typing import Callable, TypeVar

from farm import metrics
from farm.errors import RetriableError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Give up after this long: it outlasts a store or broker restart, and a worker that
#: waits longer is better used failing the item with the reason.
DEFAULT_BUDGET_SECONDS = 300.0


def with_backoff(fn: Callable[[], T], what: str, budget: float = DEFAULT_BUDGET_SECONDS,
                 first_delay: float = 0.5, max_delay: float = 15.0) -> T:
    deadline = time.monotonic() + budget
    delay = first_delay
    while True:
        try:
            return fn()
        except RetriableError as e:
            metrics.service_error(e)
            if time.monotonic() + delay > deadline:
                raise
            log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
