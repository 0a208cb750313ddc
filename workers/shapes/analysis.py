"""Reading a shapes-world picture back with plain image analysis: the background is the
colour of the border, the shape is what differs from it, its colour is the palette
colour nearest its median pixel, and its class follows from how much of its bounding
box it fills (a square all of it, a circle pi/4, an upright triangle half)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from workers.shapes.world import PALETTE

#: RGB distance from the background beyond which a pixel belongs to a shape.
_FOREGROUND = 60.0
#: A shape is a ring when the hole it encloses is at least this share of it with the hole filled.
_HOLE_SHARE = 0.05
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    background: str
    #: None when nothing stands out from the background.
    colour: str | None
    kind: str | None
    mask: np.ndarray


def nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(axis=1)))]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def background_rgb(px: np.ndarray) -> np.ndarray:
    border = np.concatenate([px[:2].reshape(-1, 3), px[-2:].reshape(-1, 3),
                             px[:, :2].reshape(-1, 3), px[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def foreground(px: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """Pixels that differ from the background: the shapes, as a boolean mask."""
    background = background_rgb(px) if background is None else background
    return np.sqrt(((px - background) ** 2).sum(axis=2)) > _FOREGROUND


def largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def shape_class(mask: np.ndarray) -> str | None:
    if mask.sum() < 20:
        return None
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    if fill >= 0.89:
        return "square"
    return "circle" if fill >= 0.64 else "triangle"


def has_hole(mask: np.ndarray) -> bool:
    """The shape encloses a patch of background (a ring, not a disc)."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    return bool(filled.sum() >= 20 and filled.sum() - mask.sum() >= _HOLE_SHARE * filled.sum())


def shape_colour(px: np.ndarray, mask: np.ndarray) -> str | None:
    if mask.sum() < 20:
        return None
    return nearest(np.median(px[mask], axis=0))


def read(image: Image.Image) -> Reading:
    """What a one-shape picture shows."""
    px = pixels(image)
    bg = background_rgb(px)
    shape = largest_component(foreground(px, bg))
    return Reading(nearest(bg), shape_colour(px, shape), shape_class(shape), shape)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
