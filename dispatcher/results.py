"""Download a job's outputs from its store into a local folder, in the store's own layout."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from farm import keys, manifest
from farm.store import KeyMissing, LocalStore, Store


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
