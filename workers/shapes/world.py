"""The shapes world: 64x64 pictures of one or two flat shapes on a plain background.

Everything here is numpy and PIL, seeded, so the training set, the tests and the
quality figures all draw from the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4

#: Shape colours, far enough apart that the nearest one names a drawn colour.
COLOURS = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "purple": (135, 45, 180),
}
#: Backgrounds: three neutrals, and any shape colour other than the shape's own.
NEUTRALS = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
}
PALETTE = {**COLOURS, **NEUTRALS}
SHAPES = ("circle", "square", "triangle")
#: A ring's hole, inset from the circle's box by this share of its side on each side.
RING_INSET = 0.27


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    #: Bounding box, in pixels: left, top, side length.
    x: int
    y: int
    size: int

    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.x + self.size, self.y + self.size


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str

    def caption(self, with_background: bool = True) -> str:
        parts = " and ".join(f"{article(s.colour)} {s.colour} {s.kind}" for s in self.shapes)
        if not with_background:
            return parts
        return f"{parts} on {article(self.background)} {self.background} background"

    def draw(self, rings: bool = False) -> Image.Image:
        """The picture; with `rings`, every circle has a hole of the background's colour (what the
        `shapes-ring` LoRA teaches)."""
        scale = _SUPERSAMPLE
        image = Image.new("RGB", (SIZE * scale, SIZE * scale), PALETTE[self.background])
        pen = ImageDraw.Draw(image)
        for s in self.shapes:
            left, top, right, bottom = (v * scale for v in s.box())
            colour = COLOURS[s.colour]
            if s.kind == "circle":
                pen.ellipse((left, top, right - 1, bottom - 1), fill=colour)
                if rings:
                    inset = (right - left) * RING_INSET
                    pen.ellipse((left + inset, top + inset, right - 1 - inset, bottom - 1 - inset),
                                fill=PALETTE[self.background])
            elif s.kind == "square":
                pen.rectangle((left, top, right - 1, bottom - 1), fill=colour)
            else:
                pen.polygon([((left + right) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=colour)
        return image.resize((SIZE, SIZE), Image.Resampling.BOX)

    def mask(self, index: int = 0) -> Image.Image:
        """A mask over one shape's bounding box grown by 3 pixels, white where to repaint."""
        left, top, right, bottom = self.shapes[index].box()
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle((left - 3, top - 3, right + 2, bottom + 2), fill=255)
        return mask


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(rng: np.random.Generator, shapes: int | None = None) -> Scene:
    count = shapes or (1 if rng.random() < 0.8 else 2)
    placed: list[Shape] = []
    while len(placed) < count:
        size = int(rng.integers(18, 41)) if count == 1 else int(rng.integers(14, 27))
        x, y = (int(v) for v in rng.integers(2, SIZE - size - 1, size=2))
        candidate = Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS))), x, y, size)
        if all(_apart(candidate, other) for other in placed):
            placed.append(candidate)
    used = {s.colour for s in placed}
    backgrounds = list(NEUTRALS) if rng.random() < 0.5 else [c for c in COLOURS if c not in used]
    return Scene(tuple(placed), str(rng.choice(backgrounds)))


def _apart(a: Shape, b: Shape, gap: int = 3) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption: usually the whole scene, sometimes without the background,
    sometimes empty (the unconditional half of classifier-free guidance)."""
    roll = rng.random()
    if roll < 0.1:
        return ""
    return scene.caption(with_background=roll >= 0.25)


def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n scenes as a uint8 array (n, 64, 64, 3) with their training captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    pixels = np.stack([np.asarray(s.draw()) for s in scenes])
    return pixels, [caption(s, rng) for s in scenes], scenes
