"""Latent noise exactly as the webui draws it (`processing.create_random_tensors`), in every mode.

Each image's noise is drawn alone, on the CPU in float32, from a generator seeded
with its seed, so it depends on the seed alone: not on the device, the batch size
or the image's place in the batch. Variation seeds blend in a second draw by slerp;
"resize seed from" draws at the old size and pastes it centred into a full draw.
"""

from __future__ import annotations

from typing import Sequence

import torch

from farm.plan import Item

LATENT_CHANNELS = 4
VAE_SCALE = 8


def randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The webui's slerp, along dim 1 of a (C, H, W) tensor, quirks included."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def item_noise(item: Item, size: tuple[int, int] | None = None, scale: int = VAE_SCALE) -> torch.Tensor:
    """The item's noise at its own size, or at `size` (W, H), as hires fix's second pass draws it.
    `scale` is the VAE's downscaling: 8 for Stable Diffusion, 4 for the built-in shapes model."""
    width, height = size or (item.width, item.height)
    shape = (LATENT_CHANNELS, height // scale, width // scale)
    if item.resize_seed_from:
        w0, h0 = item.resize_seed_from
        noise_shape = (LATENT_CHANNELS, h0 // scale, w0 // scale)
    else:
        noise_shape = shape
    noise = randn(item.seed, noise_shape)
    if item.variation_seed is not None and item.variation_strength:
        noise = slerp(item.variation_strength, noise, randn(item.variation_seed, noise_shape))
    if noise_shape != shape:
        noise = _paste_centred(randn(item.seed, shape), noise)
    return noise


def _paste_centred(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    dx = (x.shape[2] - noise.shape[2]) // 2
    dy = (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    x[:, ty:ty + h, tx:tx + w] = noise[:, sy:sy + h, sx:sx + w]
    return x


def batch_noise(items: Sequence[Item], size: tuple[int, int] | None = None, scale: int = VAE_SCALE) -> torch.Tensor:
    return torch.stack([item_noise(item, size, scale) for item in items])


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """Per-image CPU generators, for the noise that samplers and img2img draw along the way."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]
