"""From a spec to items and chunks, lazily.

Item order: grid axes in the order the spec lists them (first slowest), then
prompts, then seeds (fastest). Every item is computed from its index alone, so a
job of millions of items is never held in memory. A chunk is one batch: up to
`batch_size` consecutive items of one grid cell, which share everything a
forward pass must share (model, size, sampler, steps, CFG). The chunking is a
pure function of the spec, so a rerun renders every image in the same batch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Iterator

from farm import samplers
from farm.spec import JobSpec


@dataclass(frozen=True)
class Item:
    index: int
    prompt: str
    negative_prompt: str
    seed: int
    model: str
    mode: str
    sampler: str
    schedule_type: str
    steps: int
    cfg_scale: float
    width: int
    height: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Item":
        return cls(**data)

    def params_digest(self) -> str:
        """A digest of everything that decides this item's pixels (the batch too)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """Items rendered together in one forward pass, in this order."""

    job_id: str
    number: int
    items: tuple[Item, ...]

    @property
    def batch_size(self) -> int:
        return len(self.items)


class Plan:
    def __init__(self, spec: JobSpec, job_id: str):
        self.spec = spec
        self.job_id = job_id
        self.axes = list(spec.grid.items())
        self.cell_size = len(spec.prompts) * spec.seed_count
        self.cells = 1
        for _, values in self.axes:
            self.cells *= len(values)
        self.chunks_per_cell = -(-self.cell_size // spec.batch_size)

    @property
    def item_count(self) -> int:
        return self.cells * self.cell_size

    @property
    def chunk_count(self) -> int:
        return self.cells * self.chunks_per_cell

    def item(self, index: int) -> Item:
        if not 0 <= index < self.item_count:
            raise IndexError(f"item {index} out of range 0-{self.item_count - 1}")
        spec = self.spec
        cell, within = divmod(index, self.cell_size)
        prompt_pos, seed_pos = divmod(within, spec.seed_count)
        values = self._cell_values(cell)
        sampler, schedule = samplers.resolve(
            values.get("sampler", spec.sampler), values.get("schedule_type", spec.schedule_type)
        )
        return Item(
            index=index,
            prompt=spec.prompts[prompt_pos],
            negative_prompt=values.get("negative_prompt", spec.negative_prompt),
            seed=spec.seed_at(seed_pos),
            model=values.get("model", spec.model),
            mode=spec.mode,
            sampler=sampler.name,
            schedule_type=schedule.value,
            steps=values.get("steps", spec.steps),
            cfg_scale=float(values.get("cfg_scale", spec.cfg_scale)),
            width=values.get("width", spec.width),
            height=values.get("height", spec.height),
        )

    def _cell_values(self, cell: int) -> dict:
        values = {}
        for name, axis in reversed(self.axes):
            cell, pos = divmod(cell, len(axis))
            values[name] = axis[pos]
        return values

    def chunk(self, number: int) -> Chunk:
        if not 0 <= number < self.chunk_count:
            raise IndexError(f"chunk {number} out of range 0-{self.chunk_count - 1}")
        cell, pos = divmod(number, self.chunks_per_cell)
        start = cell * self.cell_size + pos * self.spec.batch_size
        stop = min(start + self.spec.batch_size, (cell + 1) * self.cell_size)
        return Chunk(self.job_id, number, tuple(self.item(i) for i in range(start, stop)))

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        for number in range(start, self.chunk_count):
            yield self.chunk(number)

    def chunk_of(self, index: int) -> int:
        cell, within = divmod(index, self.cell_size)
        return cell * self.chunks_per_cell + within // self.spec.batch_size
