"""The bundled shapes-sd model: its world, its reader, its tokenizer, its files, and that
its conditioning means something through the real farm (Redis, S3, a worker process)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dispatcher.submit import submit
from farm.jobs import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import wait_job
from workers import shapes
from workers.shapes import analysis, vocabulary, world

MAX_WEIGHT_BYTES = 10 * 1024 * 1024


def test_the_reader_reads_drawn_pictures_as_drawn():
    rng = np.random.default_rng(5)
    for _ in range(150):
        scene = world.random_scene(rng, shapes=1)
        got = analysis.read(scene.draw())
        shape = scene.shapes[0]
        assert (got.colour, got.background, got.kind) == (shape.colour, scene.background, shape.kind), scene
        x0, y0, x1, y1 = shape.box()
        rows, cols = np.nonzero(got.mask)
        assert x0 <= cols.min() and cols.max() < x1 and y0 <= rows.min() and rows.max() < y1


def test_captions_name_what_is_drawn():
    scene = world.Scene((world.Shape("circle", "orange", 4, 4, 20), world.Shape("square", "blue", 30, 30, 20)),
                        "white")
    assert scene.caption() == "an orange circle and a blue square on a white background"
    assert scene.caption(with_background=False) == "an orange circle and a blue square"


def test_every_world_word_is_one_token_and_other_text_still_tokenizes():
    tokenizer = vocabulary.build_tokenizer()
    for word in vocabulary.WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # start, the word, end
    ids = tokenizer("a Teal hexagon!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "atealhexagon!"


def test_the_shipped_model_is_small_and_loads_in_the_stock_sd1_pipelines():
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline,
                           StableDiffusionPipeline)

    weights = sum(f.stat().st_size for f in shapes.MODEL_DIR.rglob("*.safetensors"))
    assert 0 < weights <= MAX_WEIGHT_BYTES
    index = json.loads((shapes.MODEL_DIR / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    txt2img = StableDiffusionPipeline.from_pretrained(shapes.MODEL_DIR, local_files_only=True, safety_checker=None)
    assert txt2img.unet.config.cross_attention_dim == txt2img.text_encoder.config.hidden_size
    for cls in (StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline):
        assert cls.from_pretrained(shapes.MODEL_DIR, local_files_only=True, safety_checker=None).unet is not None


def test_hires_and_latent_upscale_work_at_the_models_latent_scale(tmp_path):
    """shapes-sd's VAE downscales by 4, not SD's 8: every path that sizes latents asks the VAE."""
    import torch

    from farm.plan import HiresPass, Item
    from workers import render
    from workers.models import ModelCache

    model = ModelCache(tmp_path, torch.device("cpu"), torch.float32).get(shapes.NAME)
    assert model.pipe.vae_scale_factor == 4
    base = dict(index=0, prompt="a red circle", negative_prompt="", seed=1, model=shapes.NAME, sampler="Euler",
                schedule_type="Automatic", steps=4, cfg_scale=7.0, width=64, height=64)
    hires = render.render(model, [Item(mode="txt2img", hires=HiresPass("Latent", 1.5, 2, 0.5), **base)], None)
    assert hires[0].size == (96, 96)
    init = world.Scene((world.Shape("square", "red", 10, 10, 30),), "white").draw()
    upscaled = render.render(model, [Item(mode="img2img", **{**base, "width": 96}, init_image="store:i",
                                          denoising_strength=0.5, resize_mode=3)], {"store:i": init}.__getitem__)
    assert upscaled[0].size == (96, 64)


# Through the farm ------------------------------------------------------------------------------

def _image(s3_server, bucket: str, job: str, index: int, seed: int) -> Image.Image:
    data = s3_server.client().get_object(Bucket=bucket, Key=f"renders/{job}/images/{index:06d}-{seed}.png")
    return Image.open(io.BytesIO(data["Body"].read())).convert("RGB")


def _run(farm_settings, spec: dict, base_dir: Path | None = None) -> str:
    job = submit(parse_spec({"model": shapes.NAME, "steps": 12, "width": 64, "height": 64, **spec},
                            base_dir=base_dir), farm_settings).job_id
    assert wait_job(JobBoard.from_url(farm_settings.broker_url), job).state is JobState.DONE
    return job


@pytest.mark.e2e
def test_the_prompts_colour_steers_the_shapes_colour(farm_settings, workers_factory, s3_server, bucket):
    workers_factory(farm_settings).start(1)
    seeds = list(range(1, 7))
    job = _run(farm_settings, {"prompts": ["a red circle on a white background",
                                           "a blue circle on a white background"], "seeds": seeds})
    colours = [[analysis.read(_image(s3_server, bucket, job, p * len(seeds) + i, seed)).colour
                for i, seed in enumerate(seeds)] for p in range(2)]
    red_prompt, blue_prompt = colours
    assert red_prompt.count("red") > blue_prompt.count("red"), colours
    assert blue_prompt.count("blue") > red_prompt.count("blue"), colours
    assert red_prompt.count("red") >= 4 and blue_prompt.count("blue") >= 4, colours


@pytest.mark.e2e
def test_img2img_keeps_the_layout_at_low_strength_and_recolours_at_high(farm_settings, workers_factory,
                                                                          s3_server, bucket, tmp_path):
    workers_factory(farm_settings).start(1)
    scene = world.Scene((world.Shape("square", "red", 12, 20, 28),), "white")
    scene.draw().save(tmp_path / "init.png")
    seeds = [1, 2, 3, 4]
    job = _run(farm_settings, {"mode": "img2img", "init_image": "init.png", "seeds": seeds,
                               "prompts": ["a red square on a white background", "a blue square on a white background"],
                               "grid": {"denoising_strength": [0.3, 0.8]}}, base_dir=tmp_path)
    # Items run grid cell by cell, then prompt by prompt, then seed by seed.
    source = analysis.read(scene.draw()).mask
    kept = [analysis.read(_image(s3_server, bucket, job, i, seed)) for i, seed in enumerate(seeds)]
    recoloured = [analysis.read(_image(s3_server, bucket, job, 12 + i, seed)) for i, seed in enumerate(seeds)]
    ious = [analysis.iou(source, r.mask) for r in kept]
    assert min(ious) >= 0.7, ious
    assert sum(r.colour == "blue" for r in recoloured) >= 3, [r.colour for r in recoloured]


@pytest.mark.e2e
def test_inpaint_recolours_the_masked_shape_and_nothing_else(farm_settings, workers_factory, s3_server, bucket,
                                                             tmp_path):
    workers_factory(farm_settings).start(1)
    scene = world.Scene((world.Shape("circle", "red", 6, 18, 24), world.Shape("square", "green", 36, 18, 22)),
                        "white")
    scene.draw().save(tmp_path / "init.png")
    scene.mask(0).save(tmp_path / "mask.png")
    seeds = [1, 2, 3, 4]
    # "only masked" renders the mask's box at the full 64x64, where the model draws whole shapes.
    job = _run(farm_settings, {"mode": "inpaint", "prompts": ["a blue circle and a green square on a white background"],
                               "init_image": "init.png", "mask": "mask.png", "mask_blur": 0,
                               "inpaint_area": "only masked", "padding": 0, "denoising_strength": 0.85,
                               "seeds": seeds}, base_dir=tmp_path)
    original = analysis.pixels(scene.draw())
    inside = np.asarray(scene.mask(0)) > 0
    recoloured = 0
    for i, seed in enumerate(seeds):
        px = analysis.pixels(_image(s3_server, bucket, job, i, seed))
        assert np.array_equal(px[~inside], original[~inside])
        shape = analysis.largest_component(analysis.foreground(px) & inside)
        recoloured += analysis.shape_colour(px, shape) == "blue"
    assert recoloured >= 3
