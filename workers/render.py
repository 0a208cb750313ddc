"""Render one batch of items with a diffusers pipeline, one function per mode.

Every item of a batch shares the model, size, sampler, steps, CFG and (for img2img
and inpaint) the init image and mask: the plan guarantees it. Each item keeps its
own seed: its own initial noise and its own CPU generator.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image

from farm.denoise import img2img_steps
from farm.errors import ModelError
from farm.plan import Item
from workers import images, noise, prompts
from workers.models import LoadedModel
from workers.schedulers import make_scheduler

#: Fetches an init image or mask by its `store:` key.
Fetch = Callable[[str], Image.Image]


def _prepared(model: LoadedModel, mode: str, items: Sequence[Item]):
    first = items[0]
    pipe = model.pipeline(mode)
    pipe.scheduler = make_scheduler(model.scheduler_config, first.sampler, first.schedule_type)
    with torch.inference_mode():
        text = prompts.embeddings(pipe, [item.prompt for item in items], [item.negative_prompt for item in items],
                                  first.clip_skip)
    common = dict(
        **text,
        guidance_scale=first.cfg_scale,
        generator=noise.generators([item.seed for item in items]),
        output_type="pil",
    )
    return pipe, first, common


def txt2img(model: LoadedModel, items: Sequence[Item], fetch: Fetch | None = None) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "txt2img", items)
    latents = noise.batch_noise(items).to(pipe.device, pipe.unet.dtype)
    with torch.inference_mode():
        return pipe(num_inference_steps=first.steps, width=first.width, height=first.height, latents=latents,
                    **common).images


def img2img(model: LoadedModel, items: Sequence[Item], fetch: Fetch) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "img2img", items)
    init = images.resize_image(first.resize_mode, images.flatten(fetch(first.init_image)), first.width, first.height)
    steps = img2img_steps(first.steps, first.denoising_strength, first.fix_steps)
    with torch.inference_mode():
        return pipe(image=[init] * len(items), strength=steps.diffusers_strength,
                    num_inference_steps=steps.schedule, **common).images


def inpaint(model: LoadedModel, items: Sequence[Item], fetch: Fetch) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "inpaint", items)
    width, height, batch = first.width, first.height, len(items)
    original = images.flatten(fetch(first.init_image))
    crop = None
    if first.inpaint_area == "whole":
        original = images.resize_image(first.resize_mode, original, width, height)
    mask = images.prepare_mask(fetch(first.mask), original.size, first.invert_mask, first.mask_blur)
    source = original if first.masked_content == "original" else images.fill(original, mask)
    work_image, work_mask = source, mask
    if first.inpaint_area == "only masked":
        # Render the mask's bounding box (plus padding, grown to W:H) at W x H; paste it back below.
        crop = pipe.mask_processor.get_crop_region(mask, width, height, pad=first.padding)
        work_image = images.resize_image(2, source.crop(crop), width, height)
        work_mask = images.resize_image(2, mask.crop(crop), width, height).convert("L")
    steps = img2img_steps(first.steps, first.denoising_strength, first.fix_steps)
    with torch.inference_mode(), _initial_latents(pipe, first.masked_content, [work_mask] * batch, width, height):
        result = pipe(image=[work_image] * batch, mask_image=[work_mask] * batch, width=width, height=height,
                      strength=steps.diffusers_strength, num_inference_steps=steps.schedule, **common).images
    # Outside the mask the output is the original, pixel for pixel (the webui's overlay).
    overlay = mask if crop else images.overlay_mask(mask)
    return [pipe.image_processor.apply_overlay(overlay, original, image, crop) for image in result]


class _initial_latents:
    """Start the masked area from what "masked content" says, the webui's way:
    original/fill: the encoded image; latent noise: the image's own seed noise;
    latent nothing: zeros. Then noise it to the first step's level, as diffusers does."""

    def __init__(self, pipe, masked_content: str, masks: list[Image.Image], width: int, height: int):
        self.pipe, self.content, self.masks = pipe, masked_content, masks
        self.width, self.height = width, height

    def __enter__(self):
        pipe = self.pipe
        original = pipe.prepare_latents

        def prepare(*args, **kwargs):
            wanted_image_latents = kwargs.get("return_image_latents", False)
            kwargs["return_image_latents"] = True
            _, noise_, image_latents = original(*args, **kwargs)
            m = self.latent_mask().to(image_latents.device, image_latents.dtype)
            if self.content == "latent noise":
                masked = noise_
            elif self.content == "latent nothing":
                masked = torch.zeros_like(image_latents)
            else:
                masked = image_latents
            start = image_latents * (1 - m) + masked * m
            latents = pipe.scheduler.add_noise(start, noise_, kwargs["timestep"])
            return (latents, noise_, image_latents) if wanted_image_latents else (latents, noise_)

        pipe.prepare_latents = prepare
        return self

    def latent_mask(self) -> torch.Tensor:
        """The mask as the pipeline sees it: binarized at 0.5, nearest-downsampled to the latent."""
        condition = self.pipe.mask_processor.preprocess(self.masks, height=self.height, width=self.width)
        scale = self.pipe.vae_scale_factor
        return torch.nn.functional.interpolate(condition, size=(self.height // scale, self.width // scale))

    def __exit__(self, *exc):
        del self.pipe.prepare_latents  # back to the class's method


RENDERERS = {"txt2img": txt2img, "img2img": img2img, "inpaint": inpaint}


def render(model: LoadedModel, items: Sequence[Item], fetch: Fetch) -> list[Image.Image]:
    mode = items[0].mode
    if model.inpainting and mode != "inpaint":
        raise ModelError(f"{model.name} is an inpainting model (9-channel UNet); use it with mode = \"inpaint\"")
    return RENDERERS[mode](model, items, fetch)
