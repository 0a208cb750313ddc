"""Submission: validate everything that can fail, then write the job and queue its chunks.

Order matters: nothing is queued until the spec is valid, the store has accepted a
write and the broker answers, so a bad job leaves no trace in the queue.
"""

from __future__ import annotations

import getpass
import json
import time
from dataclasses import dataclass

from kombu.exceptions import OperationalError

from dispatcher.inputs import upload_inputs
from farm import __version__, keys
from farm.celery_app import make_celery
from farm.errors import BrokerUnavailable
from farm.plan import Plan
from farm.progress import JobBoard
from farm.settings import Settings
from farm.spec import JobSpec
from farm.store import Store, check_writable, open_store


@dataclass(frozen=True)
class Submitted:
    job_id: str
    items: int
    chunks: int
    store: str


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def submit(spec: JobSpec, settings: Settings, user: str | None = None, store: Store | None = None) -> Submitted:
    # 1. Resolve what the job leaves open, so job.json records what runs.
    spec = spec.with_resolved_seeds()
    user = user or default_user()
    if not settings.store:
        raise ValueError("no store: set FARM_STORE (s3://bucket/prefix or a folder) or pass --store")
    store = store or open_store(settings.store, settings)
    job_id = keys.new_job_id(spec.name)

    # 2. Check every service before anything is written or queued.
    check_writable(store)
    app = make_celery(settings)
    board = JobBoard.from_url(settings.broker_url)
    _check_broker(app)
    spec = upload_inputs(spec, store, job_id)
    plan = Plan(spec, job_id)

    # 3. Write the job, then its state, then queue its chunks.
    job = {
        "job_id": job_id, "user": user, "created": time.time(), "farm_version": __version__,
        "items": plan.item_count, "chunks": plan.chunk_count, "spec": spec.to_json_dict(),
    }
    store.put(keys.job_json(job_id), json.dumps(job, indent=2, ensure_ascii=False).encode(), "application/json")
    board.create(job_id, plan.item_count, plan.chunk_count, store.url, user, spec.name or "")
    enqueue(app, plan, store.url, settings.queue)
    return Submitted(job_id, plan.item_count, plan.chunk_count, store.url)


def chunk_message(chunk, store_url: str) -> dict:
    """The task's JSON arguments: parameters and store keys, never images."""
    return {"job": chunk.job_id, "store": store_url, "chunk": chunk.number,
            "items": [item.to_dict() for item in chunk.items]}


def enqueue(app, plan: Plan, store_url: str, queue: str, start: int = 0) -> int:
    sent = 0
    with app.producer_or_acquire() as producer:
        for chunk in plan.chunks(start):
            app.send_task(keys.RENDER_TASK, kwargs=chunk_message(chunk, store_url), queue=queue, producer=producer)
            sent += 1
    return sent


def _check_broker(app) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
    except (OperationalError, OSError) as e:
        raise BrokerUnavailable(f"the broker did not answer: {e}") from None
