"""How well `shapes-sd` follows prompts, measured on images from the worker's own render path.

    python -m workers.shapes.quality [--model shapes-sd] [--seeds 20] [--grid grid.png]

txt2img: every colour x every shape, `--seeds` seeds each (20 steps, CFG 7, Euler a): does
the shape take the prompt's colour, the background the prompt's background, the shape
the prompt's class? img2img: at strength 0.3 the shape stays where it was (IoU of the
shape masks); at 0.8 with another colour named, the colour changes. Inpaint: a mask over
the shape and another colour named: the shape in the mask takes it, and every pixel
outside the mask is the original's.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from farm.plan import Item
from workers import render
from workers.models import LoadedModel, ModelCache
from workers.shapes import analysis, world

STEPS, CFG, SAMPLER = 20, 7.0, "Euler a"
TARGETS = {
    "txt2img shape colour": 0.90,
    "txt2img background colour": 0.80,
    "txt2img shape class": 0.80,
    "img2img 0.3 mask IoU >= 0.7": 0.80,
    "img2img 0.8 recoloured": 0.80,
    "inpaint recoloured": 0.80,
    "inpaint outside mask exact": 1.00,
}


@dataclass
class Tally:
    hits: dict[str, list[bool]] = field(default_factory=dict)
    ious: list[float] = field(default_factory=list)

    def add(self, name: str, ok: bool) -> None:
        self.hits.setdefault(name, []).append(bool(ok))

    def rate(self, name: str) -> float:
        values = self.hits.get(name, [])
        return sum(values) / len(values) if values else 0.0

    def table(self) -> str:
        rows = [f"{'figure':32s} {'rate':>6s} {'n':>4s} {'target':>7s}  pass"]
        for name, target in TARGETS.items():
            n = len(self.hits.get(name, []))
            rate = self.rate(name)
            rows.append(f"{name:32s} {rate:6.1%} {n:4d} {target:7.0%}  {'yes' if rate >= target else 'NO'}")
        if self.ious:
            rows.append(f"img2img 0.3 mask IoU: median {np.median(self.ious):.3f}, min {min(self.ious):.3f}")
        return "\n".join(rows)

    def passed(self) -> bool:
        return all(self.rate(name) >= target for name, target in TARGETS.items())


def item(prompt: str, seed: int, mode: str = "txt2img", **changes) -> Item:
    fields = dict(index=0, prompt=prompt, negative_prompt="", seed=seed, model="shapes-sd", mode=mode,
                  sampler=SAMPLER, schedule_type="Automatic", steps=STEPS, cfg_scale=CFG,
                  width=world.SIZE, height=world.SIZE)
    if mode != "txt2img":
        fields.update(init_image="store:init", denoising_strength=0.8)
    if mode == "inpaint":
        fields.update(mask="store:mask", mask_blur=0, masked_content="original", inpaint_area="whole", padding=0)
    fields.update(changes)
    return Item(**fields)


def prompt_for(colour: str, kind: str, background: str) -> str:
    return world.Scene((world.Shape(kind, colour, 0, 0, 1),), background).caption()


def other_colour(rng: np.random.Generator, scene: world.Scene) -> str:
    shape = scene.shapes[0]
    return str(rng.choice([c for c in world.COLOURS if c not in (shape.colour, scene.background)]))


def txt2img(model: LoadedModel, tally: Tally, seeds: int, rng: np.random.Generator) -> list[Image.Image]:
    pictures = []
    for colour in world.COLOURS:
        for kind in world.SHAPES:
            backgrounds = [b for b in world.PALETTE if b != colour]
            batch = [item(prompt_for(colour, kind, str(rng.choice(backgrounds))), 1000 + s) for s in range(seeds)]
            batch = [replace(it, index=i) for i, it in enumerate(batch)]
            for it, picture in zip(batch, render.render(model, batch, None)):
                got = analysis.read(picture)
                wanted_background = it.prompt.rsplit(" ", 2)[1]
                tally.add("txt2img shape colour", got.colour == colour)
                tally.add("txt2img background colour", got.background == wanted_background)
                tally.add("txt2img shape class", got.kind == kind)
                pictures.append(picture)
    return pictures


def img2img(model: LoadedModel, tally: Tally, count: int, rng: np.random.Generator) -> None:
    for i in range(count):
        scene = world.random_scene(rng, shapes=1)
        source = scene.draw()
        fetch = {"store:init": source}.__getitem__
        kept = render.render(model, [item(scene.caption(), 2000 + i, "img2img", denoising_strength=0.3)], fetch)[0]
        iou = analysis.iou(analysis.read(source).mask, analysis.read(kept).mask)
        tally.ious.append(iou)
        tally.add("img2img 0.3 mask IoU >= 0.7", iou >= 0.7)
        colour = other_colour(rng, scene)
        prompt = recoloured(scene, colour).caption()
        changed = render.render(model, [item(prompt, 3000 + i, "img2img", denoising_strength=0.8)], fetch)[0]
        tally.add("img2img 0.8 recoloured", analysis.read(changed).colour == colour)


def recoloured(scene: world.Scene, colour: str) -> world.Scene:
    return replace(scene, shapes=(replace(scene.shapes[0], colour=colour),) + scene.shapes[1:])


def inpaint(model: LoadedModel, tally: Tally, count: int, rng: np.random.Generator, strength: float = 0.85) -> None:
    for i in range(count):
        scene = world.random_scene(rng, shapes=1)
        source, mask = scene.draw(), scene.mask()
        colour = other_colour(rng, scene)
        fetch = {"store:init": source, "store:mask": mask}.__getitem__
        out = render.render(model, [item(recoloured(scene, colour).caption(), 4000 + i, "inpaint",
                                         denoising_strength=strength)], fetch)[0]
        inside = np.asarray(mask) > 0
        px, original = analysis.pixels(out), analysis.pixels(source)
        tally.add("inpaint outside mask exact", np.array_equal(px[~inside], original[~inside]))
        shape = analysis.largest_component(analysis.foreground(px) & inside)
        tally.add("inpaint recoloured", analysis.shape_colour(px, shape) == colour)


def grid(pictures: list[Image.Image], columns: int) -> Image.Image:
    """The pictures in rows of `columns`, as they are."""
    width, height = pictures[0].size
    sheet = Image.new("RGB", (columns * width, -(-len(pictures) // columns) * height), "white")
    for i, picture in enumerate(pictures):
        row, column = divmod(i, columns)
        sheet.paste(picture, (column * width, row * height))
    return sheet


def load(model: str | Path, cache_dir: Path) -> LoadedModel:
    return ModelCache(cache_dir, torch.device("cpu"), torch.float32).get(str(model))


def measure(model: LoadedModel, seeds: int = 20, edits: int = 60, grid_path: Path | None = None) -> Tally:
    tally = Tally()
    pictures = txt2img(model, tally, seeds, np.random.default_rng(1))
    img2img(model, tally, edits, np.random.default_rng(2))
    inpaint(model, tally, edits, np.random.default_rng(3))
    if grid_path:
        grid(pictures, seeds).save(grid_path)
    return tally


def report(model: str | Path, quick: bool = False, grid_path: Path | None = None) -> Tally:
    with tempfile.TemporaryDirectory() as cache:
        loaded = load(model, Path(cache))
        tally = measure(loaded, seeds=4 if quick else 20, edits=12 if quick else 60, grid_path=grid_path)
    print(tally.table(), flush=True)
    return tally


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shapes-sd", help="a built-in name or a diffusers folder")
    parser.add_argument("--quick", action="store_true", help="fewer images: a rough figure in seconds")
    parser.add_argument("--grid", type=Path, help="write the txt2img images as one grid PNG")
    args = parser.parse_args()
    tally = report(args.model, args.quick, args.grid)
    raise SystemExit(0 if tally.passed() else 1)


if __name__ == "__main__":
    main()
