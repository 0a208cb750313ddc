"""Render one batch of items with a diffusers pipeline.

Initial noise follows the webui: each image's latent noise is drawn alone, on the
CPU, in float32, from a generator seeded with that image's seed, then the batch is
stacked. The noise therefore depends on the seed alone, not on the device, the
batch size or the image's place in the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from farm.plan import Item
from workers.models import LoadedModel
from workers.schedulers import make_scheduler

LATENT_CHANNELS = 4
VAE_SCALE = 8


def initial_noise(seeds: Sequence[int], width: int, height: int) -> torch.Tensor:
    shape = (LATENT_CHANNELS, height // VAE_SCALE, width // VAE_SCALE)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """Per-image CPU generators, for the noise that ancestral samplers draw at each step."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def txt2img(model: LoadedModel, items: Sequence[Item]) -> list[Image.Image]:
    first = items[0]
    pipe = model.pipe
    pipe.scheduler = make_scheduler(model.scheduler_config, first.sampler, first.schedule_type)
    seeds = [item.seed for item in items]
    latents = initial_noise(seeds, first.width, first.height).to(pipe.device, pipe.unet.dtype)
    with torch.inference_mode():
        result = pipe(
            prompt=[item.prompt for item in items],
            negative_prompt=[item.negative_prompt for item in items],
            num_inference_steps=first.steps,
            guidance_scale=first.cfg_scale,
            width=first.width,
            height=first.height,
            latents=latents,
            generator=generators(seeds),
            output_type="pil",
        )
    return result.images
