"""Per-item records and the manifest assembled from them.

S3 has no append, so every item's row is its own object (`records/<index>.json`);
the manifest is assembled once from them when the job completes, or on demand.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from farm import keys
from farm.store import Store

#: The manifest's columns, in order; each is also a field of a record.
FIELDS = (
    "index", "key", "prompt", "negative_prompt", "seed", "sampler", "schedule_type", "steps", "cfg_scale",
    "width", "height", "model", "model_hash", "mode", "sha256", "worker", "device", "seconds",
    "batch", "batch_size", "batch_position", "rendered_with", "params",
)


def read_records(store: Store, job_id: str) -> list[dict]:
    record_keys = list(store.list(keys.records_prefix(job_id)))
    with ThreadPoolExecutor(max_workers=8) as pool:
        records = list(pool.map(lambda k: json.loads(store.get(k)), record_keys))
    return sorted(records, key=lambda r: r["index"])


def assemble(store: Store, job_id: str) -> list[dict]:
    """Write `<job>/manifest.jsonl` from the records stored so far; return the rows."""
    rows = read_records(store, job_id)
    body = "".join(json.dumps({f: r.get(f) for f in FIELDS}, ensure_ascii=False) + "\n" for r in rows)
    store.put(keys.manifest(job_id), body.encode("utf-8"), "application/x-ndjson")
    return rows
