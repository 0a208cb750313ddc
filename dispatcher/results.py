"""Download a job's outputs from its store into a local folder, in the store's own layout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from farm import keys, manifest
from farm.store import KeyMissing, LocalStore, S3Store, Store

#: The longest a SigV4 presigned URL may live.
MAX_URL_SECONDS = 7 * 24 * 3600
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '7d' -> seconds, between 1 s and 7 days."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:], None)
    number = value[:-1] if unit else value
    if not number.isdigit():
        raise ValueError(f"--expires: expected a duration such as 3600, 30m, 1h or 7d, got {text!r}")
    seconds = int(number) * (unit or 1)
    if not 1 <= seconds <= MAX_URL_SECONDS:
        raise ValueError(f"--expires: must be between 1 second and 7 days, got {text!r}")
    return seconds


def share(store: Store, job_id: str, expires: int) -> list[tuple[str, str]]:
    """Presigned GET URLs for the job's manifest and every image: anyone holding one can download
    that object, without credentials, until it expires."""
    if not isinstance(store, S3Store):
        raise ValueError("presigned URLs need an S3 store (s3://bucket/prefix); this job's store is a folder")
    try:
        store.get(keys.manifest(job_id))
    except KeyMissing:
        manifest.assemble(store, job_id)
    wanted = [keys.manifest(job_id), *store.list(keys.images_prefix(job_id))]
    return [(key, store.presigned_url(key, expires)) for key in wanted]


def download(store: Store, job_id: str, out: Path, on_file: Callable[[str], None] | None = None) -> list[str]:
    """Copy job.json, manifest.jsonl and every image of the job under `out/<job>/`."""
    target = LocalStore(out)
    try:
        store.get(keys.manifest(job_id))
    except KeyMissing:
        manifest.assemble(store, job_id)  # the job is unfinished or its finisher died
    wanted = [keys.job_json(job_id), keys.manifest(job_id), *store.list(keys.images_prefix(job_id))]

    def copy(key: str) -> str:
        target.put(key, store.get(key))
        if on_file:
            on_file(key)
        return key

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(copy, wanted))
