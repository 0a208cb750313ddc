"""Render one batch of items with a diffusers pipeline, one function per mode.

Every item of a batch shares the model, size, sampler, steps, CFG and (for img2img
and inpaint) the init image and mask: the plan guarantees it. Each item keeps its
own seed: its own initial noise and its own CPU generator.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import torch
from PIL import Image

from farm import samplers
from farm.denoise import img2img_steps
from farm.errors import ModelError
from farm.plan import Item
from farm.prompts import extra_networks, schedules
from farm.spec import ResizeMode, hires_size
from workers import images, noise, prompts
from workers.models import LoadedModel
from workers.schedulers import make_scheduler

#: Fetches an init image or mask by its `store:` key.
Fetch = Callable[[str], Image.Image]
#: The `Image.info` entry where a drawn image carries infotext only its drawing knew (TI hashes).
EXTRA_PARAMS = "farm-extra-params"


def _configured(model: LoadedModel, mode: str, items: Sequence[Item], vae=None):
    """The mode's pipeline with this batch's scheduler and VAE (the override, or the model's own)."""
    first = items[0]
    pipe = model.pipeline(mode)
    pipe.scheduler = make_scheduler(model.scheduler_config, first.sampler, first.schedule_type,
                                    [item.seed for item in items])
    pipe.vae = vae.module if vae is not None else model.own_vae
    return pipe


def _prepared(model: LoadedModel, mode: str, items: Sequence[Item], vae=None, on_step=None, embeddings=None):
    first = items[0]
    pipe = _configured(model, mode, items, vae)
    common = dict(
        **_conditioning(model, pipe, items, on_step, _evaluations(first, first.steps), embeddings=embeddings),
        guidance_scale=first.cfg_scale,
        generator=noise.generators([item.seed for item in items]),
        output_type="pil",
    )
    return pipe, first, common


def _evaluations(item: Item, steps: int) -> int:
    return samplers.SAMPLERS[item.sampler].evaluations(steps)


def _conditioning(model: LoadedModel, pipe, items: Sequence[Item], on_step, steps: int,
                  hires_steps: int | None = None, embeddings=None) -> dict:
    """The prompt arguments of a pipeline call and its step callback: the webui's prompt language
    (emphasis, chunks, prompt editing switched per evaluation)."""
    first = items[0]
    positive, negative = [_text(item) for item in items], [item.negative_prompt for item in items]
    # Always both keys, so that a second pass's arguments replace the first's whole.
    step = {"callback_on_step_end": on_step, "callback_on_step_end_tensor_inputs": ["latents"]}
    with torch.inference_mode():
        schedule = prompts.PromptSchedule(pipe, positive, negative, steps, hires_steps=hires_steps,
                                          clip_skip=first.clip_skip, emphasis=first.emphasis, xl=model.xl,
                                          embeddings=embeddings)
        text = schedule.at(0)
    if schedule.changes:
        step = {"callback_on_step_end": schedule.switching(on_step),
                "callback_on_step_end_tensor_inputs": schedule.tensor_inputs(model.xl)}
    return {**text, **step}


def txt2img(model: LoadedModel, items: Sequence[Item], fetch: Fetch | None = None, vae=None,
            on_step=None, embeddings=None) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "txt2img", items, vae, on_step, embeddings)
    latents = noise.batch_noise(items, scale=pipe.vae_scale_factor).to(pipe.device, pipe.unet.dtype)
    if first.hires:
        return _hires(model, pipe, items, common, latents, vae, on_step, embeddings)
    with torch.inference_mode():
        return pipe(num_inference_steps=first.steps, width=first.width, height=first.height, latents=latents,
                    **common).images


def _hires(model: LoadedModel, pipe, items: Sequence[Item], common: dict, latents: torch.Tensor,
           vae, on_step, embeddings) -> list[Image.Image]:
    """The webui's hires fix: a first pass, an upscale, then img2img at the larger size running
    exactly the second-pass steps (the webui always "fixes" them there), from fresh seed noise."""
    first = items[0]
    hires = first.hires
    width, height = hires_size(first.width, first.height, hires.scale)
    with torch.inference_mode():
        first_pass = pipe(num_inference_steps=first.steps, width=first.width, height=first.height, latents=latents,
                          **{**common, "output_type": "latent" if hires.latent else "pil"}).images
    if hires.latent:
        mode = "nearest" if hires.upscaler == "Latent (nearest)" else "bilinear"
        scale = pipe.vae_scale_factor
        upscaled = torch.nn.functional.interpolate(first_pass, size=(height // scale, width // scale), mode=mode)
    else:
        resample = Image.Resampling.LANCZOS if hires.upscaler == "Lanczos" else Image.Resampling.NEAREST
        upscaled = [image.resize((width, height), resample=resample) for image in first_pass]
    second = _configured(model, "img2img", items, vae)
    # fix_steps needs a strength above 0; at 0 the second pass takes its one step, as img2img does.
    strength = hires.denoising_strength
    plan = img2img_steps(hires.steps or first.steps, strength, fix_steps=strength > 0)
    # The second pass counts prompt-editing steps on from the first, as the webui does.
    text = _conditioning(model, second, items, on_step, _evaluations(first, first.steps),
                         _evaluations(first, hires.steps or first.steps), embeddings)
    with torch.inference_mode(), _seed_noise(second, items, (width, height)):
        return second(image=upscaled, strength=plan.diffusers_strength, num_inference_steps=plan.schedule,
                      **{**common, **text, "generator": noise.generators([item.seed for item in items])}).images


def img2img(model: LoadedModel, items: Sequence[Item], fetch: Fetch, vae=None, on_step=None,
            embeddings=None) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "img2img", items, vae, on_step, embeddings)
    picture = images.flatten(fetch(first.init_image))
    if first.resize_mode == ResizeMode.LATENT_UPSCALE:
        init = _latent_upscaled(pipe, picture, first.width, first.height, common["generator"])
    else:
        init = [images.resize_image(first.resize_mode, picture, first.width, first.height)] * len(items)
    steps = img2img_steps(first.steps, first.denoising_strength, first.fix_steps)
    with torch.inference_mode(), _seed_noise(pipe, items):
        return pipe(image=init, strength=steps.diffusers_strength, num_inference_steps=steps.schedule,
                    **common).images


def _latent_upscaled(pipe, picture: Image.Image, width: int, height: int, generators) -> torch.Tensor:
    """The webui's resize mode 3: encode at the image's own size (rounded down to a multiple
    of 8), then resize bilinearly in latent space. diffusers takes 4-channel input as latents."""
    scale = pipe.vae_scale_factor
    w, h = picture.width // 8 * 8, picture.height // 8 * 8
    pixels = pipe.image_processor.preprocess(picture.resize((w, h), Image.Resampling.LANCZOS))
    pixels = pixels.to(pipe.device, pipe.vae.dtype)
    with torch.inference_mode():
        encoded = pipe.vae.encode(pixels).latent_dist
        latents = torch.cat([encoded.sample(generator=g) for g in generators]) * pipe.vae.config.scaling_factor
    return torch.nn.functional.interpolate(latents, size=(height // scale, width // scale), mode="bilinear")


class _seed_noise:
    """img2img noises the encoded image with each seed's own noise, as the webui does, instead
    of the generator's next draw after it has sampled the VAE: so one seed gives the same noise
    in every mode, and variation seeds and "resize seed from" apply here too. The pipeline's
    module draws that noise with `randn_tensor` once, in prepare_latents; it is swapped for the
    call (a worker process renders one batch at a time)."""

    def __init__(self, pipe, items: Sequence[Item], size: tuple[int, int] | None = None):
        self.module = sys.modules[type(pipe).__module__]
        self.noise = noise.batch_noise(items, size, pipe.vae_scale_factor)

    def __enter__(self):
        self.original = self.module.randn_tensor

        def seed_noise(shape, generator=None, device=None, dtype=None, layout=None):
            if tuple(shape) != tuple(self.noise.shape):
                raise RuntimeError(f"img2img asked for noise of shape {tuple(shape)}, not {tuple(self.noise.shape)}")
            return self.noise.to(device, dtype)

        self.module.randn_tensor = seed_noise
        return self

    def __exit__(self, *exc):
        self.module.randn_tensor = self.original


def inpaint(model: LoadedModel, items: Sequence[Item], fetch: Fetch, vae=None, on_step=None,
            embeddings=None) -> list[Image.Image]:
    pipe, first, common = _prepared(model, "inpaint", items, vae, on_step, embeddings)
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
        work_image = images.resize_image(ResizeMode.RESIZE_AND_FILL, source.crop(crop), width, height)
        work_mask = images.resize_image(ResizeMode.RESIZE_AND_FILL, mask.crop(crop), width, height).convert("L")
    steps = img2img_steps(first.steps, first.denoising_strength, first.fix_steps)
    with torch.inference_mode(), _seed_noise(pipe, items), \
            _initial_latents(pipe, first.masked_content, [work_mask] * batch, width, height):
        result = pipe(image=[work_image] * batch, mask_image=[work_mask] * batch, width=width, height=height,
                      strength=steps.diffusers_strength, num_inference_steps=steps.schedule, **common).images
    # Outside the mask the output is the original, pixel for pixel (the webui's overlay).
    overlay = mask if crop else images.overlay_mask(mask)
    return [pipe.image_processor.apply_overlay(overlay, original, image, crop) for image in result]


class _initial_latents:
    """Start the masked area from what "masked content" says, the webui's way:
    original/fill: the encoded image; latent noise: the image's own seed noise;
    latent nothing: zeros. Then noise it to the first step's level, as diffusers does (with
    each seed's own noise, under _seed_noise)."""

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


def render(model: LoadedModel, items: Sequence[Item], fetch: Fetch, vae=None, on_step=None,
           embeddings=None, loras=None) -> list[Image.Image]:
    """Render a batch; `vae` is a loaded VAE override (workers.models.LoadedVae) or None;
    `on_step` is a diffusers `callback_on_step_end` (progress, and the cancel check);
    `embeddings` and `loras` the operator's textual inversions and LoRAs (workers.embeddings,
    workers.lora)."""
    mode = items[0].mode
    if model.inpainting and mode != "inpaint":
        raise ModelError(f"{model.name} is an inpainting model (9-channel UNet); use it with mode = \"inpaint\"")
    pipe = model.pipeline(mode)
    read = {item.index: prompts.read(pipe, _texts(item), item.emphasis, model.xl, embeddings) for item in items}
    networks = {item.index: tuple(extra_networks(item.prompt)[1]) for item in items}
    # Prompts of different lengths cannot share a conditioning tensor without padding that would
    # change their images, and different LoRA sets cannot share weights: each is its own batch,
    # the images back in the items' order.
    groups: dict[tuple, list[Item]] = {}
    for item in items:
        groups.setdefault((read[item.index][0], networks[item.index]), []).append(item)
    drawn: dict[int, Image.Image] = {}
    for (_, refs), group in groups.items():
        if refs and loras is None:
            raise ModelError(f"{refs[0].shown}: this worker has no LoRA folder (FARM_LORA_DIR)")
        model.loras.use(pipe, refs, loras, dict(group[0].loras))
        drawn.update(zip((item.index for item in group),
                         RENDERERS[mode](model, group, fetch, vae, on_step, embeddings)))
    for item in items:
        extra = {"Lora hashes": _lora_hashes(networks[item.index], loras, dict(item.loras)),
                 "TI hashes": prompts.ti_hashes(read[item.index][1])}
        if any(extra.values()):
            drawn[item.index].info[EXTRA_PARAMS] = {k: v for k, v in extra.items() if v}
    return [drawn[item.index] for item in items]


def _lora_hashes(refs, loras, sources: dict[str, str]) -> str | None:
    """The webui's `Lora hashes` value: "name: shorthash, ..." for every LoRA the prompt names."""
    names = {ref.name.replace(":", "").replace(",", ""): loras.get(ref.name, sources.get(ref.name)).shorthash
             for ref in refs}
    return ", ".join(f"{name}: {digest}" for name, digest in names.items()) or None


def _text(item: Item) -> str:
    """The item's prompt as the text encoder reads it: without its `<lora:...>` tags."""
    return extra_networks(item.prompt)[0]


def _texts(item: Item) -> list[str]:
    """Every text the item's conditioning is encoded from, in each pass."""
    steps = _evaluations(item, item.steps)
    passes = [None] if item.hires is None else [None, _evaluations(item, item.hires.steps or item.steps)]
    return [text for prompt in (_text(item), item.negative_prompt) for hires_steps in passes
            for _, text in schedules(prompt, steps, hires_steps)]
