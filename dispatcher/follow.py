"""Follow a job until it finishes, calling back with each fresh status."""

from __future__ import annotations

import time
from typing import Callable

from farm.jobs import JobBoard, JobStatus


def follow(board: JobBoard, job_id: str, on_status: Callable[[JobStatus], None] | None = None,
           interval: float = 0.25, timeout: float | None = None) -> JobStatus:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = board.status(job_id)
        if on_status:
            on_status(status)
        if status.finished:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not finished after {timeout:.0f}s: {status.done}/{status.total} done")
        # Sleeps `interval`, or less: the job's end wakes it at once.
        board.wait_ended(job_id, interval)
