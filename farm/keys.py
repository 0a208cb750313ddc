"""Every store key, Redis key, queue name and TTL farm uses, in one place.

Store keys are pure functions of the job id and the item (index, seed): a rerun
or a redelivered task writes the same key again, never a second object.
"""

from __future__ import annotations

import re
import secrets
import time

# --- store layout, under the store's prefix -------------------------------------------

JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_job_id(name: str | None = None) -> str:
    """A fresh, sortable job id; the spec's validated name leads it when given."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return f"{name or 'job'}-{stamp}-{secrets.token_hex(3)}"


def check_job_id(job_id: str) -> str:
    """Job ids become key components, so they may never carry a path separator or `..`."""
    if not JOB_ID_PATTERN.fullmatch(job_id) or ".." in job_id:
        raise ValueError(f"not a job id: {job_id[:80]!r}")
    return job_id


def job_json(job_id: str) -> str:
    """The normalized spec with resolved seeds, written once at submission."""
    return f"{check_job_id(job_id)}/job.json"


def image(job_id: str, index: int, seed: int) -> str:
    """One image: `<job>/images/<index:06d>-<seed>.png`."""
    return f"{check_job_id(job_id)}/images/{index:06d}-{seed}.png"


def job_input(job_id: str, digest: str, suffix: str) -> str:
    """An init image or mask uploaded at submission, named by its content's sha256."""
    return f"{check_job_id(job_id)}/inputs/{digest}{suffix}"


def record(job_id: str, index: int) -> str:
    """One item's manifest row, written after its image; S3 has no append."""
    return f"{check_job_id(job_id)}/records/{index:06d}.json"


def failure_record(job_id: str, index: int) -> str:
    """An item that failed for good, with the reason; the job's store then says what is missing
    and why without Redis (`farm export`'s failed.jsonl)."""
    return f"{check_job_id(job_id)}/failures/{index:06d}.json"


def failure_records_prefix(job_id: str) -> str:
    return f"{check_job_id(job_id)}/failures/"


def records_prefix(job_id: str) -> str:
    return f"{check_job_id(job_id)}/records/"


def images_prefix(job_id: str) -> str:
    return f"{check_job_id(job_id)}/images/"


def manifest(job_id: str) -> str:
    """All records of a job, one JSON object a line, in index order; assembled at the end."""
    return f"{check_job_id(job_id)}/manifest.jsonl"


# --- Redis ------------------------------------------------------------------------------

PREFIX = "farm"

#: Sorted set of job ids by submission time, for listing.
JOBS_INDEX = f"{PREFIX}:jobs"


def user_jobs(user: str) -> str:
    """Sorted set: one user's job ids by submission time (`GET /v1/jobs`)."""
    return f"{PREFIX}:user:{user}:jobs"


#: Sorted set: webhook delivery id -> when it is next due (farm/webhooks.py).
WEBHOOKS_DUE = f"{PREFIX}:webhooks:due"


def webhook(delivery_id: str) -> str:
    """Hash: one webhook delivery (url, body, first try, attempts, delivered or gave_up)."""
    return f"{PREFIX}:webhook:{delivery_id}"


def webui_current(user: str) -> str:
    """String: the job a user's last /sdapi/v1 txt2img or img2img call made (progress, interrupt)."""
    return f"{PREFIX}:webui:{user}:current"


def webui_options(user: str) -> str:
    """Hash: a user's /sdapi/v1/options (the farm keeps sd_model_checkpoint, per user)."""
    return f"{PREFIX}:webui:{user}:options"


#: Hash: SHA-256 of an API token -> JSON {user, admin, created}. Tokens themselves are
#: never stored.
TOKENS = f"{PREFIX}:tokens"


#: Hash: worker name -> JSON {host, since, queue}, written when a worker is ready and
#: removed when it shuts down cleanly; `farm run` and the tests wait on it.
WORKERS = f"{PREFIX}:workers"


def job_hash(job_id: str) -> str:
    """Hash: state, totals, counters, timestamps and the store URL of one job."""
    return f"{PREFIX}:job:{job_id}"


def done_bits(job_id: str) -> str:
    """Bitmap, one bit per item: set when its image and record are stored. A bitmap
    makes counting exact under redelivery (SETBIT returns the old bit) and costs
    125 kB for a million items."""
    return f"{PREFIX}:job:{job_id}:done"


def failed_bits(job_id: str) -> str:
    """Bitmap, one bit per item that failed permanently."""
    return f"{PREFIX}:job:{job_id}:failed"


def failures(job_id: str) -> str:
    """Hash: item index -> the reason it failed."""
    return f"{PREFIX}:job:{job_id}:failures"


def running(job_id: str) -> str:
    """Hash: chunk number -> JSON {worker, items, started} for chunks being rendered."""
    return f"{PREFIX}:job:{job_id}:running"


def deliveries(job_id: str) -> str:
    """Hash: chunk number -> how many times a worker started it. Above 1 means the
    chunk was redelivered (a worker died, or the broker restarted)."""
    return f"{PREFIX}:job:{job_id}:deliveries"


def cursors(job_id: str) -> str:
    """Hash: model group -> how many of that group's chunks the feeder has handed out."""
    return f"{PREFIX}:job:{job_id}:cursors"


def handed_back(job_id: str) -> str:
    """List of chunk numbers to hand out again before new ones: from a dead worker, a
    paused job, or a transient failure."""
    return f"{PREFIX}:job:{job_id}:retry"


def attempts(job_id: str) -> str:
    """Hash: chunk number -> how many times it failed with a transient error."""
    return f"{PREFIX}:job:{job_id}:attempts"


def ended(job_id: str) -> str:
    """List: one entry pushed when the job ends, so whoever follows it wakes at once instead of
    at its next poll."""
    return f"{PREFIX}:job:{job_id}:ended"


def job_keys(job_id: str) -> list[str]:
    return [job_hash(job_id), done_bits(job_id), failed_bits(job_id), failures(job_id), running(job_id),
            deliveries(job_id), cursors(job_id), handed_back(job_id), attempts(job_id), ended(job_id)]


# --- the pool: lanes, fair share, workers, the feeder ---------------------------------------

#: Lanes in the order they are served: every runnable interactive chunk goes before any batch one.
LANES = ("interactive", "batch")


def lane_jobs(lane: str) -> str:
    """Sorted set: the unfinished jobs of a lane, by submission time."""
    return f"{PREFIX}:lane:{lane}"


def lane_shares(lane: str) -> str:
    """Sorted set: user -> GPU-seconds charged in this lane since the user last became active."""
    return f"{PREFIX}:share:{lane}"


def worker_live(worker: str) -> str:
    """Hash: a worker's heartbeat, models held, model loads, current chunk and step, images/min."""
    return f"{PREFIX}:worker:{worker}"


def worker_assigned(worker: str) -> str:
    """Hash: `<job>/<chunk>` -> JSON {model, items, at}: chunks the feeder sent to this worker
    that it has not finished; handed back to their jobs if the worker dies."""
    return f"{PREFIX}:worker:{worker}:assigned"


def assignment(job_id: str, chunk: int) -> str:
    return f"{job_id}/{chunk}"


def worker_queue(queue: str, worker: str) -> str:
    """Each worker has its own broker queue; the feeder decides which chunk goes to which worker."""
    return f"{queue}.{worker}"


#: List the workers and `farm submit` push to, so the dispatcher tops up at once instead of at
#: its next tick.
FEEDER_WAKE = f"{PREFIX}:feeder:wake"
#: Hash: `<done|failed>|<lane>|<user>` -> items settled since the pool began (Prometheus' farm_items_total),
#: raised by the Lua call that counts an item, so a redelivered item is counted once.
ITEM_STATS = f"{PREFIX}:stats:items"

#: Hash: `<model>|<W>x<H>` -> seconds per image per denoising step, as the pool last measured it
#: (the workers write it; `farm explain` estimates from it).
PACE = f"{PREFIX}:pace"


def pace_field(model: str, width: int, height: int) -> str:
    return f"{model}|{width}x{height}"


#: List: ended jobs whose spec asks for an [export], for a dispatcher to export.
EXPORTS = f"{PREFIX}:exports"
#: List: the exports a dispatcher has taken and not finished (a restarted one takes them again).
EXPORTS_RUNNING = f"{PREFIX}:exports:running"


def export_lock(job_id: str) -> str:
    """String with a TTL, renewed while a dispatcher exports the job."""
    return f"{PREFIX}:job:{job_id}:export-lock"
#: One feeder at a time, whichever dispatcher holds this.
FEEDER_LOCK = f"{PREFIX}:feeder:lock"
#: A running dispatcher's heartbeat (expires when it stops).
DISPATCHER = f"{PREFIX}:dispatcher"


#: How long a finished job's state stays in Redis. Its images, records and
#: manifest stay in the store; a week covers `farm status` after a long weekend.
FINISHED_JOB_TTL = 7 * 24 * 3600

# --- Celery -------------------------------------------------------------------------------

#: The render task, sent by name so the sender needs no worker code.
RENDER_TASK = "farm.render_chunk"
