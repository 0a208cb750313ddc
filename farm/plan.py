"""From a spec to items and chunks, lazily.

Item order: grid axes in the order the spec lists them (first slowest), then
prompts, then seeds (fastest). Every item is computed from its index alone, so a
job of millions of items is never held in memory. A chunk is one batch: up to
`batch_size` consecutive items of one grid cell, which share everything a
forward pass must share (model, size, sampler, steps, CFG). The chunking is a
pure function of the spec, so a rerun renders every image in the same batch.
"""

from __future__ import annotations

from dataclasses import asdict, astuple, dataclass
from typing import Iterator

from farm import prompts, samplers
from farm.spec import PROMPT_SR, JobSpec


@dataclass(frozen=True)
class HiresPass:
    """Hires fix's second pass: how the first pass is upscaled, and the img2img run at the larger size."""

    upscaler: str
    scale: float
    #: Steps of the second pass; 0 means as many as the first.
    steps: int
    denoising_strength: float

    @property
    def latent(self) -> bool:
        """Upscaled in latent space (the "Latent" upscalers), not as pixels."""
        return self.upscaler.startswith("Latent")


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
    clip_skip: int = 1
    emphasis: str = "Original"
    vae: str | None = None
    hires: HiresPass | None = None
    variation_seed: int | None = None
    variation_strength: float = 0.0
    resize_seed_from: tuple[int, int] | None = None
    #: Store keys (`store:<key>`) of the init image and mask, for img2img and inpaint.
    init_image: str | None = None
    mask: str | None = None
    denoising_strength: float | None = None
    fix_steps: bool = False
    resize_mode: int = 0
    mask_blur: int = 0
    masked_content: str | None = None
    inpaint_area: str | None = None
    padding: int = 0
    invert_mask: bool = False
    #: The job's own LoRA files that the prompt names: (name, `store:` key), by name.
    loras: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready; hires as its four values in order, the form messages and records carry.
        `loras` only when there are any, so the records of jobs without keep their digests."""
        data = asdict(self)
        if self.hires is not None:
            data["hires"] = list(astuple(self.hires))
        if not self.loras:
            del data["loras"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Item":
        data = dict(data)
        if data.get("resize_seed_from") is not None:
            data["resize_seed_from"] = tuple(data["resize_seed_from"])
        if data.get("hires") is not None:
            data["hires"] = HiresPass(*data["hires"])
        if data.get("loras"):
            data["loras"] = tuple(tuple(pair) for pair in data["loras"])
        return cls(**data)


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
        if spec.init_images:
            self.axes.append(("init_image", spec.init_images))
        self.cell_size = len(spec.prompts) * spec.seed_count
        self.cells = 1
        for _, values in self.axes:
            self.cells *= len(values)
        self.chunks_per_cell = -(-self.cell_size // spec.batch_size)

    @classmethod
    def from_job_json(cls, job: dict, job_id: str) -> "Plan":
        """A job's plan from the job.json written at submission. The spec was validated then; the
        workers still refuse pickles unless the operator allows them."""
        return cls(JobSpec.model_validate(job["spec"], context={"allow_pickle": True}), job_id)

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
        value = lambda name: values.get(name, getattr(spec, name))  # noqa: E731
        image_mode = spec.mode != "txt2img"
        inpaint = spec.mode == "inpaint"
        strength = float(value("variation_strength"))
        prompt, negative = spec.prompts[prompt_pos], value("negative_prompt")
        if PROMPT_SR in values:
            searched = spec.grid[PROMPT_SR][0]
            prompt, negative = (text.replace(searched, values[PROMPT_SR]) for text in (prompt, negative))
        return Item(
            index=index,
            prompt=prompt,
            negative_prompt=negative,
            seed=spec.seed_at(seed_pos),
            model=value("model"),
            mode=spec.mode,
            sampler=sampler.name,
            schedule_type=schedule.value,
            steps=value("steps"),
            cfg_scale=float(value("cfg_scale")),
            width=value("width"),
            height=value("height"),
            clip_skip=value("clip_skip"),
            emphasis=value("emphasis"),
            vae=value("vae"),
            hires=HiresPass(spec.hires.upscaler, spec.hires.scale, spec.hires.steps, spec.hires.denoising_strength)
            if spec.hires else None,
            variation_seed=value("variation_seed") if strength > 0 else None,
            variation_strength=strength,
            resize_seed_from=tuple(spec.resize_seed_from) if spec.resize_seed_from else None,
            init_image=value("init_image") if image_mode else None,
            mask=spec.mask if inpaint else None,
            denoising_strength=float(value("denoising_strength")) if image_mode else None,
            fix_steps=spec.fix_steps if image_mode else False,
            resize_mode=spec.resize_mode if image_mode else 0,
            mask_blur=value("mask_blur") if inpaint else 0,
            masked_content=value("masked_content") if inpaint else None,
            inpaint_area=spec.inpaint_area if inpaint else None,
            padding=spec.padding if inpaint else 0,
            invert_mask=spec.invert_mask if inpaint else False,
            loras=self._job_loras(prompt) if spec.loras else (),
        )

    def _job_loras(self, prompt: str) -> tuple[tuple[str, str], ...]:
        named = {ref.name for ref in prompts.extra_networks(prompt)[1]}
        return tuple(sorted((name, ref) for name, ref in self.spec.loras.items() if name in named))

    def dimensions(self) -> list[tuple[str, list]]:
        """Every axis an item's index runs over, outermost first: the grid's (and a list of init
        images), then `prompt`, then `seed`. Their sizes multiply to the item count."""
        spec = self.spec
        return [*self.axes, ("prompt", list(spec.prompts)), ("seed", [spec.seed_at(i) for i in range(spec.seed_count)])]

    def index_at(self, positions: dict[str, int]) -> int:
        """The item at these positions along `dimensions()` (0 for an axis not given)."""
        index = 0
        for name, values in self.dimensions():
            index = index * len(values) + positions.get(name, 0)
        return index

    def _cell_values(self, cell: int) -> dict:
        values = {}
        for name, axis in reversed(self.axes):
            cell, pos = divmod(cell, len(axis))
            values[name] = axis[pos]
        return values

    def chunk(self, number: int) -> Chunk:
        if not 0 <= number < self.chunk_count:
            raise IndexError(f"chunk {number} out of range 0-{self.chunk_count - 1}")
        return Chunk(self.job_id, number, tuple(self.item(i) for i in self.chunk_range(number)))

    def chunks(self, start: int = 0) -> Iterator[Chunk]:
        for number in range(start, self.chunk_count):
            yield self.chunk(number)

    # --- model groups: the chunks of each model, for routing work to workers that hold it ---

    @property
    def models(self) -> list[str]:
        """One entry per model group: the grid's model axis in order, or the spec's one model."""
        for name, values in self.axes:
            if name == "model":
                return [str(v) for v in values]
        return [self.spec.model]

    def group_chunk_count(self, group: int) -> int:
        return self.chunk_count // len(self.models)

    def group_chunk(self, group: int, ordinal: int) -> int:
        """The chunk number of the `ordinal`-th chunk of model group `group`, computed, not listed:
        cells of one model repeat with the model axis' stride, so a million cells cost nothing."""
        if not 0 <= ordinal < self.group_chunk_count(group):
            raise IndexError(f"chunk {ordinal} of model group {group} out of range")
        cell, pos = divmod(ordinal, self.chunks_per_cell)
        stride, count = self._model_axis_shape()
        outer, inner = divmod(cell, stride)
        return ((outer * count + group) * stride + inner) * self.chunks_per_cell + pos

    def _model_axis_shape(self) -> tuple[int, int]:
        """(cells per step of the model axis, number of models); (cells, 1) without a model axis."""
        stride = self.cells
        for name, values in self.axes:
            stride //= len(values)
            if name == "model":
                return stride, len(values)
        return self.cells, 1

    def chunk_range(self, number: int) -> range:
        """The item indexes of a chunk, without building its items."""
        cell, pos = divmod(number, self.chunks_per_cell)
        start = cell * self.cell_size + pos * self.spec.batch_size
        return range(start, min(start + self.spec.batch_size, (cell + 1) * self.cell_size))

    def chunk_of(self, index: int) -> int:
        cell, within = divmod(index, self.cell_size)
        return cell * self.chunks_per_cell + within // self.spec.batch_size
