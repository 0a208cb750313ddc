"""Grids that read like the webui's X/Y/Z plot: a job's images with its axes' values on the top
and left edges (`CFG scale: 7`, `Seed: 3`), wrapped over lines, never cut, in a TrueType font;
one grid per Z value, side by side, each under its own title.

An axis is any of the job's dimensions (its grid axes, `prompt`, `seed`). X runs across, Y
down, Z side by side; each may join several axes (the job's default grid has seeds across and
prompts and grid cells down). Axes with more than one value that no side names are added to Y,
so every image has a cell; `where` fixes an axis at one value instead. Thumbnails are resized
so the whole grid stays within `max_side` pixels; a grid that cannot says how to split it.
Images not stored (failed, or still to render) are drawn as empty cells labelled "missing".
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass, field
from functools import cache
from itertools import product
from pathlib import Path, PurePosixPath

from PIL import Image, ImageDraw, ImageFont

from farm.infotext import format_value
from farm.stored import StoredJob

MAX_SIDE = 4096
#: Tiles are enlarged to this many pixels when the grid has room: a 64-pixel image under a
#: readable label would leave the label wider than its column.
MIN_TILE = 128
#: Below this a tile shows too little to compare; the grid must be split instead.
SMALLEST_TILE = 24
MIN_FONT = 13
BACKGROUND, INK, MISSING = "white", "black", (225, 225, 225)

#: The webui's X/Y/Z plot names; None shows the value alone (as its Prompt S/R axis does).
LABELS = {
    "seed": "Seed", "prompt": None, "prompt_sr": None, "cfg_scale": "CFG scale", "steps": "Steps",
    "sampler": "Sampler", "schedule_type": "Schedule type", "model": "Checkpoint name", "vae": "VAE",
    "negative_prompt": "Negative prompt", "width": "Width", "height": "Height", "denoising_strength": "Denoising",
    "mask_blur": "Mask blur", "masked_content": "Masked content", "clip_skip": "Clip skip", "emphasis": "Emphasis",
    "variation_seed": "Var. seed", "variation_strength": "Var. strength", "init_image": "Init image",
}
_PATH_AXES = ("model", "vae", "init_image")


class GridError(ValueError):
    """A grid that cannot be drawn as asked: an unknown axis, or too many images for its size."""


def label(axis: str, value) -> str:
    if axis in _PATH_AXES and isinstance(value, str):
        value = PurePosixPath(value.removeprefix("store:")).stem
    text = format_value(value)
    name = LABELS.get(axis, axis)
    return f"{name}: {text}" if name else text


@dataclass(frozen=True)
class Side:
    """One side of the grid: the axes it joins (outermost first) and their values."""

    axes: tuple[tuple[str, list], ...]

    def __len__(self) -> int:
        count = 1
        for _, values in self.axes:
            count *= len(values)
        return count

    def positions(self) -> list[dict[str, int]]:
        return [dict(zip((n for n, _ in self.axes), combo))
                for combo in product(*(range(len(v)) for _, v in self.axes))]

    def labels(self) -> list[list[str]]:
        """Each entry's label lines, one per axis."""
        return [[label(name, values[pos[name]]) for name, values in self.axes] for pos in self.positions()]


@dataclass
class Layout:
    """Where everything was drawn: what a test (or a tool) reads back."""

    size: tuple[int, int]
    tile: tuple[int, int]
    #: (box, item index, stored): one per cell.
    cells: list[tuple[tuple[int, int, int, int], int, bool]] = field(default_factory=list)
    #: (box, text): every label and title, with the box its lines fill.
    labels: list[tuple[tuple[int, int, int, int], str]] = field(default_factory=list)


def sides(job: StoredJob, x: list[str] | None = None, y: list[str] | None = None, z: list[str] | None = None,
          where: dict[str, str] | None = None) -> tuple[Side, Side, Side, dict[str, int]]:
    """X, Y and Z from axis names, and the positions `where` fixes. Default: seeds across, the
    rest down."""
    dims = dict(job.plan.dimensions())
    fixed = {}
    for name, wanted in (where or {}).items():
        _known(name, dims)
        shown = [label(name, v) for v in dims[name]]
        matches = [i for i, v in enumerate(dims[name]) if wanted in (format_value(v), shown[i], str(v))]
        if not matches:
            raise GridError(f"--where {name}={wanted}: no such value; it has {', '.join(shown)}")
        fixed[name] = matches[0]
    x = list(x if x is not None else (["seed"] if "seed" not in (y or []) + (z or []) else []))
    y, z = list(y or []), list(z or [])
    named = x + y + z
    for name in named:
        _known(name, dims)
        if name in fixed:
            raise GridError(f"{name} is fixed by --where; it cannot also be an axis")
    if len(set(named)) != len(named):
        raise GridError("an axis can be on one side only")
    y += [n for n in dims if n not in named and n not in fixed and (len(dims[n]) > 1 or n == "prompt")]
    pick = lambda names: Side(tuple((n, dims[n]) for n in names))  # noqa: E731
    return pick(x), pick(y), pick(z), fixed


def _known(name: str, dims: dict) -> None:
    if name not in dims:
        raise GridError(f"no axis {name!r} in this job; it has {', '.join(dims)}")


@cache
def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans (Debian's fonts-dejavu-core, or matplotlib's copy), else Pillow's own
    TrueType font."""
    candidates = [Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
                  Path("/usr/share/fonts/dejavu/DejaVuSans.ttf")]
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        candidates.append(Path(spec.submodule_search_locations[0]) / "mpl-data/fonts/ttf/DejaVuSans.ttf")
    for path in candidates:
        if path.is_file():
            return ImageFont.truetype(str(path), size)
    return ImageFont.load_default(size)


def wrap(text: str, face, width: int) -> list[str]:
    """Lines no wider than `width`: whole words where they fit, a long word broken anywhere."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if face.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and face.getlength(line + char) > width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


@dataclass
class _Geometry:
    tile: tuple[int, int]
    font_size: int
    left: int
    top: int
    title: int
    gap: int
    size: tuple[int, int]


def _geometry(image_size: tuple[int, int], x: Side, y: Side, z: Side, scale: float) -> _Geometry:
    tw, th = max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))
    size = max(MIN_FONT, min(tw, th) // 12)
    face = font(size)
    line = _line_height(face)
    left_lines = [line for entry in y.labels() for line in entry]
    left = 0
    if y.axes:
        widest = max((face.getlength(t) for t in left_lines), default=0)
        left = int(min(max(widest + 12, tw), max(2 * tw, 240)))
    top = _strip(x.labels(), face, tw - 6, line) if x.axes else 0
    grid_w = left + len(x) * tw
    title = _strip(z.labels(), face, grid_w - 6, line) if z.axes else 0
    gap = max(8, tw // 4) if z.axes else 0
    columns = len(z)
    width = columns * grid_w + (columns - 1) * gap
    height = title + top + len(y) * th
    return _Geometry((tw, th), size, left, top, title, gap, (width, height))


def _line_height(face) -> int:
    ascent, descent = face.getmetrics()
    return ascent + descent + 2


def _strip(entries: list[list[str]], face, width: int, line: int) -> int:
    most = max((sum(len(wrap(t, face, width)) for t in entry) for entry in entries), default=0)
    return most * line + 8


def fit(image_size: tuple[int, int], x: Side, y: Side, z: Side, max_side: int = MAX_SIDE) -> _Geometry:
    """The largest tiles (up to MIN_TILE, or the images' own size if larger) under `max_side`."""
    start = max(1.0, MIN_TILE / min(image_size))
    scale = start
    while True:
        geometry = _geometry(image_size, x, y, z, scale)
        if max(geometry.size) <= max_side:
            return geometry
        if min(geometry.tile) <= SMALLEST_TILE:
            raise GridError(
                f"{len(x) * len(z)} x {len(y)} images do not fit in {max_side} px a side even at "
                f"{SMALLEST_TILE} px a tile; split it: --where AXIS=VALUE draws one slice, or put an axis on "
                "--z, or raise --max-side")
        scale *= 0.9


def draw(job: StoredJob, x: Side, y: Side, z: Side, fixed: dict[str, int] | None = None,
         max_side: int = MAX_SIDE) -> tuple[Image.Image, Layout]:
    fixed = fixed or {}
    cells = [(zi, yi, xi, {**fixed, **zp, **yp, **xp})
             for zi, zp in enumerate(z.positions()) for yi, yp in enumerate(y.positions())
             for xi, xp in enumerate(x.positions())]
    indexes = [job.plan.index_at(positions) for *_, positions in cells]
    stored = [i for i in indexes if i in job.done]
    if not stored:
        raise GridError("no image of this grid is stored yet")
    first = Image.open(io.BytesIO(job.image(job.plan.item(stored[0]))))
    g = fit(first.size, x, y, z, max_side)
    tw, th = g.tile
    thumbs = dict(zip(stored, job.images(iter(stored), lambda item, data: _thumbnail(data, g.tile))))
    sheet = Image.new("RGB", g.size, BACKGROUND)
    pen = ImageDraw.Draw(sheet)
    face = font(g.font_size)
    line = _line_height(face)
    layout = Layout(g.size, g.tile)
    grid_w = g.left + len(x) * tw
    for zi, title in enumerate(z.labels() if z.axes else [[]]):
        x0 = zi * (grid_w + g.gap)
        if title:
            _text(pen, layout, face, line, title, (x0 + 3, 4, x0 + grid_w - 3), centre=True)
        for xi, entry in enumerate(x.labels() if x.axes else []):
            left = x0 + g.left + xi * tw
            _text(pen, layout, face, line, entry, (left + 3, g.title + 4, left + tw - 3), centre=True)
        for yi, entry in enumerate(y.labels() if y.axes else []):
            top = g.title + g.top + yi * th
            _text(pen, layout, face, line, entry, (x0 + 6, top + 4, x0 + g.left - 6), centre=False)
    for (zi, yi, xi, _), index in zip(cells, indexes):
        box = (zi * (grid_w + g.gap) + g.left + xi * tw, g.title + g.top + yi * th)
        box = (*box, box[0] + tw, box[1] + th)
        if index in thumbs:
            sheet.paste(thumbs[index], box[:2])
        else:
            pen.rectangle((box[0] + 1, box[1] + 1, box[2] - 2, box[3] - 2), fill=MISSING)
            pen.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "missing", fill=INK, font=face, anchor="mm")
        layout.cells.append((box, index, index in thumbs))
    return sheet, layout


def _thumbnail(data: bytes, tile: tuple[int, int]) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        picture = image.convert("RGB")
    resample = Image.Resampling.NEAREST if tile[0] >= picture.width * 2 else Image.Resampling.LANCZOS
    return picture.resize(tile, resample)


def _text(pen, layout: Layout, face, line: int, entry: list[str], box: tuple[int, int, int], centre: bool) -> None:
    left, top, right = box
    y = top
    for text in entry:
        for piece in wrap(text, face, right - left):
            x = (left + right) / 2 if centre else left
            pen.text((x, y), piece, fill=INK, font=face, anchor="ma" if centre else "la")
            y += line
    layout.labels.append(((left, top, right, y), "\n".join(entry)))


def job_grid(job: StoredJob, max_side: int = MAX_SIDE) -> tuple[Image.Image, Layout]:
    """The job's default grid (seeds across; grid cells and prompts down)."""
    return draw(job, *sides(job)[:3], max_side=max_side)


def write_job_grid(job_dir: Path, max_side: int = MAX_SIDE) -> Path | None:
    """`grid.png` beside a downloaded or `farm run` job's images (a folder laid out as the store).
    None when the job has no image yet; GridError when it is too large for one grid."""
    from farm.store import LocalStore

    if not (job_dir / "job.json").is_file():
        return None
    job = StoredJob(LocalStore(job_dir.parent), job_dir.name)
    if not job.done_count:
        return None
    path = job_dir / "grid.png"
    job_grid(job, max_side)[0].save(path)
    return path
