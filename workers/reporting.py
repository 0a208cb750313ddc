"""What a rendering process tells the pool: the step it is at, its models, its pace.

A step callback runs inside the diffusers loop. At most twice a second it writes the
chunk's progress (for `farm status --watch`) and the worker's current step (for
`farm workers`), and reads the job's state in the same round trip: a cancelled job
stops at that step.
"""

from __future__ import annotations

import time
from collections import deque

import redis

from farm import pool
from farm.errors import BrokerUnavailable, FarmError
from farm.jobs import JobBoard, JobState
from farm.plan import Chunk


class JobCancelled(FarmError):
    """The job was cancelled while this chunk was rendering."""


class StepReporter:
    """The `callback_on_step_end` of a chunk's pipeline calls."""

    def __init__(self, board: JobBoard, worker: str, chunk: Chunk, every: float = 0.5):
        self.board, self.worker, self.chunk, self.every = board, worker, chunk, every
        self.passes = 2 if chunk.items[0].hires else 1
        self.pass_index = 0
        self.last_step = -1
        # The first report comes after `every` seconds too: a chunk shorter than that is over
        # before anyone could watch it, and costs no round trip.
        self.last_report = time.monotonic()
        self.since = time.time()

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if step < self.last_step:
            self.pass_index = min(self.pass_index + 1, self.passes - 1)
        self.last_step = step
        now = time.monotonic()
        if now - self.last_report >= self.every:
            self.last_report = now
            total = getattr(pipe, "num_timesteps", None) or step + 1
            self.report(step + 1, total)
        return callback_kwargs

    def report(self, step: int, steps: int) -> None:
        fraction = (self.pass_index + step / max(1, steps)) / self.passes
        chunk = self.chunk
        current = {"job": chunk.job_id, "chunk": chunk.number, "items": chunk.batch_size, "step": step,
                   "steps": steps, "pass": self.pass_index + 1, "passes": self.passes}
        row = {"worker": self.worker, "items": chunk.batch_size, "since": self.since, "fraction": round(fraction, 3)}
        try:
            with self.board.redis.pipeline() as pipe:
                self.board.set_running(chunk.job_id, chunk.number, row, pipe)
                pool.publish(pipe, self.worker, current=current)
                self.board.queue_state(pipe, chunk.job_id)
                *_, state = pipe.execute()
        except (redis.RedisError, BrokerUnavailable):
            return  # progress is best effort; Redis being away must not fail the render
        if JobState.decode(state) is JobState.CANCELLED:
            raise JobCancelled(f"job {chunk.job_id} was cancelled")


class Pace:
    """Images per minute over the last few minutes of this process."""

    def __init__(self, window: float = 300.0):
        self.window = window
        self.events: deque[tuple[float, float, int]] = deque()
        self.images = 0

    def add(self, started: float, finished: float, images: int) -> None:
        self.images += images
        self.events.append((started, finished, images))
        while self.events and finished - self.events[0][1] > self.window:
            self.events.popleft()

    @property
    def per_minute(self) -> float:
        if not self.events:
            return 0.0
        span = self.events[-1][1] - self.events[0][0]
        return round(60 * sum(e[2] for e in self.events) / max(span, 1e-3), 1)


def idle_fields(runtime, pace: Pace) -> dict:
    """The worker's live fields between chunks (farm.pool.publish writes them)."""
    return {"current": None, "models": runtime.models.refs(), "loads": runtime.models.loads,
            "device": runtime.device_name, "images": pace.images, "images_per_minute": pace.per_minute}
