"""What a job has in its store, read without Redis: its plan (from job.json), which items have
an image, which failed and why (the workers' failure records). Shared by `farm export` and
`farm grid`; a million items cost two bitmaps of 125 kB.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator, TypeVar

from farm import keys
from farm.errors import JobNotFound
from farm.plan import Item, Plan
from farm.store import KeyMissing, Store

#: Objects read from the store at once.
WINDOW = 16
T = TypeVar("T")


class Bitmap:
    """One bit per item: a million items cost 125 kB."""

    def __init__(self, size: int):
        self.size = size
        self.bits = bytearray((size + 7) // 8)

    def add(self, index: int) -> None:
        self.bits[index >> 3] |= 1 << (index & 7)

    def __contains__(self, index: int) -> bool:
        return bool(self.bits[index >> 3] >> (index & 7) & 1)

    def count(self) -> int:
        return sum(bin(byte).count("1") for byte in self.bits)

    def from_(self, start: int = 0) -> Iterator[int]:
        """The set indexes from `start` up, in order."""
        for byte_pos in range(start >> 3, len(self.bits)):
            byte = self.bits[byte_pos]
            if not byte:
                continue
            for bit in range(8):
                index = (byte_pos << 3) | bit
                if byte >> bit & 1 and index >= start:
                    yield index


def index_of(key: str) -> int | None:
    """`<index>-<seed>.png` or `<index>.json` -> index."""
    name = key.rsplit("/", 1)[-1]
    head = name.split("-", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else None


class StoredJob:
    """What a job has in its store: its plan, which items have an image, which failed and why."""

    def __init__(self, store: Store, job_id: str):
        self.store, self.job_id = store, job_id
        try:
            job = json.loads(store.get(keys.job_json(job_id)))
        except KeyMissing:
            raise JobNotFound(f"no job {job_id} in the store {store.url}") from None
        self.created = int(job.get("created", 0))
        self.plan = Plan.from_job_json(job, job_id)
        self.total = self.plan.item_count
        self.done = self._listed(keys.images_prefix(job_id))
        self.failed = self._listed(keys.failure_records_prefix(job_id), skip=self.done)
        self.done_count, self.failed_count = self.done.count(), self.failed.count()

    def _listed(self, prefix: str, skip: Bitmap | None = None) -> Bitmap:
        bits = Bitmap(self.total)
        for key in self.store.list(prefix):
            index = index_of(key)
            if index is not None and index < self.total and not (skip and index in skip):
                bits.add(index)
        return bits

    @property
    def missing(self) -> int:
        """Items with neither an image nor a failure: still to render (or lost)."""
        return self.total - self.done_count - self.failed_count

    def failures(self) -> Iterator[dict]:
        for index in self.failed.from_():
            yield json.loads(self.store.get(keys.failure_record(self.job_id, index)))

    def image(self, item: Item) -> bytes:
        return self.store.get(keys.image(self.job_id, item.index, item.seed))

    def images(self, indexes: Iterator[int], read: Callable[[Item, bytes], T],
               window: int = WINDOW) -> Iterator[T]:
        """`read(item, png)` for each item of `indexes` (stored ones), in their order; `window`
        reads run at once ahead of the consumer."""
        def fetch(index: int) -> T:
            item = self.plan.item(index)
            return read(item, self.image(item))

        with ThreadPoolExecutor(max_workers=window, thread_name_prefix="farm-store-read") as pool:
            ahead: deque[Future] = deque()
            for index in indexes:
                ahead.append(pool.submit(fetch, index))
                if len(ahead) >= window:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()


