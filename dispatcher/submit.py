"""Submission: validate everything that can fail, then write the job and put it in its lane.

Order matters: nothing is written to Redis until the spec is valid, the store has
accepted a write and the broker answers, so a bad job leaves no trace. Nothing is
queued here at all: the feeder (dispatcher/feeder.py) hands chunks to workers a few
at a time, so a million-item job is accepted in the time it takes to write job.json.
"""

from __future__ import annotations

import getpass
import json
import re
import time
from dataclasses import dataclass

from kombu.exceptions import OperationalError

from dispatcher.inputs import upload_inputs
from farm import __version__, fairshare, keys, loras
from farm.celery_app import make_celery
from farm.connections import connect
from farm.errors import BrokerUnavailable, SpecError
from farm.jobs import JobBoard
from farm.plan import Plan
from farm.settings import Settings
from farm.spec import JobSpec
from farm.store import Store, check_writable, open_store


USER_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")


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


def submit(spec: JobSpec, settings: Settings, user: str | None = None, store: Store | None = None,
           lane: str | None = None, priority: int | None = None) -> Submitted:
    # 1. Resolve what the job leaves open, so job.json records what runs.
    spec = spec.with_resolved_seeds()
    spec = with_placement(spec, lane, priority)
    user = check_user(user or default_user())
    if spec.webhook and not settings.webhook_secret:
        raise SpecError.single("webhook", "this farm signs webhooks with FARM_WEBHOOK_SECRET, and none is set")
    if problems := loras.check(spec, settings.lora_dir):
        raise SpecError(problems)
    store = store or open_store(settings.require_store(), settings)
    job_id = keys.new_job_id(spec.name)

    # 2. Check every service before anything is written or queued.
    check_writable(store)
    app = make_celery(settings)
    board = JobBoard(connect(settings))
    _check_broker(app)
    spec = upload_inputs(spec, store, job_id)
    plan = Plan(spec, job_id)

    # 3. Write the job, then its state, then put it in its lane for the feeder.
    created = time.time()
    job = {
        "job_id": job_id, "user": user, "created": created, "farm_version": __version__,
        "items": plan.item_count, "chunks": plan.chunk_count, "spec": spec.to_json_dict(),
    }
    store.put(keys.job_json(job_id), json.dumps(job, indent=2, ensure_ascii=False).encode(), "application/json")
    register(board, job_id, plan, store_url=store.url, user=user, created=created)
    return Submitted(job_id, plan.item_count, plan.chunk_count, store.url)


def register(board: JobBoard, job_id: str, plan: Plan, *, store_url: str, user: str, created: float) -> None:
    """The job's state in Redis, then its place in its lane (`farm resume` rebuilds through here too)."""
    spec = plan.spec
    board.create(job_id, total=plan.item_count, chunks=plan.chunk_count, store_url=store_url, user=user,
                 name=spec.name or "", lane=spec.lane, priority=spec.priority, created=created,
                 webhook=spec.webhook, webhook_each=spec.webhook_each, export=spec.export is not None)
    fairshare.enlist(board, job_id, spec.lane, user, created)


def check_placement(lane: str | None, priority: int | None) -> None:
    if lane is not None and lane not in keys.LANES:
        raise SpecError.single("lane", f"must be one of {', '.join(keys.LANES)}, got {lane!r}")
    if priority is not None and not -100 <= priority <= 100:
        raise SpecError.single("priority", f"must be between -100 and 100, got {priority}")


def with_placement(spec: JobSpec, lane: str | None, priority: int | None) -> JobSpec:
    """The spec with the command line's lane and priority, which win over the file's."""
    check_placement(lane, priority)
    changes = {k: v for k, v in (("lane", lane), ("priority", priority)) if v is not None}
    return spec.model_copy(update=changes) if changes else spec


def check_user(user: str) -> str:
    """A user name is shown and used as a fair-share key, never as a path: keep it plain."""
    if not USER_PATTERN.fullmatch(user):
        raise SpecError.single("user", "use 1-64 letters, digits, and . _ @ - (it names whose job this is)")
    return user


def _check_broker(app) -> None:
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=2, interval_start=0.2, interval_step=0.5, timeout=5)
    except (OperationalError, OSError) as e:
        raise BrokerUnavailable(f"the broker did not answer: {e}") from None
