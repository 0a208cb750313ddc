"""Generation semantics as the webui means them, checked against direct diffusers calls (CPU, tiny models)."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from farm import infotext, samplers
from farm.denoise import img2img_steps
from farm.errors import ModelError
from farm.plan import HiresPass, Item
from workers import images, noise, render
from workers.models import ModelCache
from workers.schedulers import make_scheduler
from workers.tiny import SCHEDULER_CONFIG

W = H = 64


@pytest.fixture(scope="module")
def models(cache_dir):
    return ModelCache(cache_dir, torch.device("cpu"), torch.float32, capacity=4)


@pytest.fixture(scope="module")
def inputs():
    init = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(init).ellipse((20, 10, 60, 50), fill="red")
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((30, 20, 60, 45), fill=255)
    return {"store:init": init, "store:mask": mask}


def item(index=0, mode="txt2img", **changes) -> Item:
    fields = dict(index=index, prompt="a red circle", negative_prompt="blurry", seed=100 + index, model="tiny-sd",
                  mode=mode, sampler="Euler a", schedule_type="Automatic", steps=6, cfg_scale=7.0, width=W, height=H)
    if mode != "txt2img":
        fields.update(init_image="store:init", denoising_strength=0.6)
    if mode == "inpaint":
        fields.update(mask="store:mask", mask_blur=4, masked_content="original", inpaint_area="whole", padding=8)
    fields.update(changes)
    return Item(**fields)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def accepted_combinations():
    for name, sampler in samplers.SAMPLERS.items():
        for schedule in sampler.schedules:
            yield name, schedule.value


# --- oracle: what the farm renders equals a direct diffusers call ----------------------------------

@pytest.mark.parametrize("sampler, schedule", list(accepted_combinations()))
def test_txt2img_equals_direct_pipeline_call_for_every_sampler(models, sampler, schedule):
    model = models.get("tiny-sd")
    items = [item(0, sampler=sampler, schedule_type=schedule), item(1, sampler=sampler, schedule_type=schedule)]
    farm = render.render(model, items, fetch=None)

    pipe = diffusers.StableDiffusionPipeline(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _direct_scheduler(model, sampler, schedule)
    latents = torch.stack([torch.randn((4, H // 8, W // 8), generator=torch.Generator().manual_seed(s)) for s in (100, 101)])
    direct = pipe(prompt=["a red circle"] * 2, negative_prompt=["blurry"] * 2, num_inference_steps=6, guidance_scale=7.0,
                  width=W, height=H, latents=latents,
                  generator=[torch.Generator().manual_seed(s) for s in (100, 101)]).images
    for a, b in zip(farm, direct):
        assert a.tobytes() == b.tobytes()
        assert not np.isnan(np.asarray(a, dtype=np.float32)).any()


def _seed_noise(seeds, size=(W, H)):
    """Each seed's own latent noise, drawn alone on the CPU: the noise the webui uses in every mode."""
    return torch.stack([torch.randn((4, size[1] // 8, size[0] // 8), generator=torch.Generator().manual_seed(s))
                        for s in seeds])


def _noised_with_seed_noise(pipe, seeds, monkeypatch):
    """The pipeline, unchanged but for the noise that img2img adds to the encoded image: each
    seed's own, not the generator's next draw after it sampled the VAE."""
    import sys

    monkeypatch.setattr(sys.modules[type(pipe).__module__], "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None, layout=None:
                        _seed_noise(seeds).to(device, dtype))
    return pipe


def _direct_scheduler(model, sampler, schedule, seeds=(100, 101)):
    resolved, concrete = samplers.resolve(sampler, schedule)
    scheduler = getattr(diffusers, resolved.scheduler_class).from_config(
        model.scheduler_config, **resolved.options, **samplers.SCHEDULE_FLAGS[concrete])
    if isinstance(scheduler, diffusers.DPMSolverSDEScheduler):
        scheduler.noise_sampler_seed = list(seeds)  # one Brownian tree per image, from its seed
    return scheduler


@pytest.mark.parametrize("sampler, schedule", list(accepted_combinations()))
def test_img2img_equals_direct_pipeline_call(models, inputs, sampler, schedule, monkeypatch):
    model = models.get("tiny-sd")
    items = [item(i, "img2img", resize_mode=1, sampler=sampler, schedule_type=schedule, steps=4) for i in range(2)]
    farm = render.render(model, items, inputs.__getitem__)

    init = images.resize_image(1, inputs["store:init"], W, H)
    pipe = _noised_with_seed_noise(diffusers.StableDiffusionImg2ImgPipeline(**model.pipe.components), (100, 101),
                                   monkeypatch)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _direct_scheduler(model, sampler, schedule)
    # 4 steps at strength 0.6: the webui runs int(0.6 * 4) + 1 = 3 of them
    direct = pipe(prompt=["a red circle"] * 2, negative_prompt=["blurry"] * 2, image=[init, init],
                  strength=(3 + 0.5) / 4, num_inference_steps=4, guidance_scale=7.0,
                  generator=[torch.Generator().manual_seed(s) for s in (100, 101)]).images
    assert [a.tobytes() for a in farm] == [b.tobytes() for b in direct]


@pytest.mark.parametrize("sampler, schedule", list(accepted_combinations()))
def test_inpaint_equals_direct_pipeline_call_with_the_webui_overlay(models, inputs, sampler, schedule, monkeypatch):
    model = models.get("tiny-sd")
    items = [item(i, "inpaint", sampler=sampler, schedule_type=schedule, steps=4) for i in range(2)]
    farm = render.render(model, items, inputs.__getitem__)

    init = images.resize_image(0, inputs["store:init"], W, H)
    mask = images.prepare_mask(inputs["store:mask"], (W, H), invert=False, blur=4)
    pipe = _noised_with_seed_noise(diffusers.StableDiffusionInpaintPipeline(**model.pipe.components), (100, 101),
                                   monkeypatch)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = _direct_scheduler(model, sampler, schedule)
    direct = pipe(prompt=["a red circle"] * 2, negative_prompt=["blurry"] * 2, image=[init, init], mask_image=[mask, mask],
                  width=W, height=H, strength=(3 + 0.5) / 4, num_inference_steps=4, guidance_scale=7.0,
                  generator=[torch.Generator().manual_seed(s) for s in (100, 101)]).images
    overlay = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    expected = [pipe.image_processor.apply_overlay(overlay, init, image) for image in direct]
    assert [a.tobytes() for a in farm] == [b.tobytes() for b in expected]


# --- img2img steps and denoising strength --------------------------------------------------------

@pytest.mark.parametrize("steps, strength, fix, schedule, run", [
    (20, 0.75, False, 20, 16),   # the webui's example
    (20, 0.5, False, 20, 11),
    (20, 0.0, False, 20, 1),     # 0 still takes one step at the lowest noise
    (20, 0.01, False, 20, 1),    # below 1/steps: diffusers alone would crash
    (20, 1.0, False, 20, 20),    # capped at 0.999
    (20, 0.5, True, 40, 20),     # fix steps: exactly `steps` run
])
def test_img2img_step_mapping(steps, strength, fix, schedule, run):
    planned = img2img_steps(steps, strength, fix)
    assert (planned.schedule, planned.run) == (schedule, run)
    # what diffusers' get_timesteps will run with the strength we hand it
    assert min(int(planned.schedule * planned.diffusers_strength), planned.schedule) == run


@pytest.mark.parametrize("strength, fix, expected_calls", [(0.75, False, 16), (0.0, False, 1), (0.01, False, 1),
                                                           (1.0, False, 20), (0.5, True, 20)])
def test_unet_runs_the_webui_number_of_steps(models, inputs, strength, fix, expected_calls):
    model = models.get("tiny-sd")
    calls = []
    handle = model.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        render.render(model, [item(0, "img2img", steps=20, denoising_strength=strength, fix_steps=fix)],
                      inputs.__getitem__)
    finally:
        handle.remove()
    assert len(calls) == expected_calls


# --- inpaint --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_name", ["tiny-sd", "tiny-sd-inpaint"])
@pytest.mark.parametrize("content", ["fill", "original", "latent noise", "latent nothing"])
@pytest.mark.parametrize("area", ["whole", "only masked"])
def test_inpaint_keeps_every_pixel_outside_the_mask(models, inputs, model_name, content, area):
    out = render.render(models.get(model_name), [item(0, "inpaint", model=model_name, masked_content=content,
                                                      inpaint_area=area)], inputs.__getitem__)[0]
    original = inputs["store:init"] if area == "only masked" else images.resize_image(0, inputs["store:init"], W, H)
    assert out.size == original.size  # "only masked" keeps the original's size (96x64)
    mask = np.asarray(images.prepare_mask(inputs["store:mask"], original.size, False, 4))
    keep = mask == 0
    assert (pixels(out)[keep] == pixels(original)[keep]).all()
    assert (pixels(out)[~keep] != pixels(original)[~keep]).any()


def test_initial_latent_follows_masked_content(models, inputs):
    """latent nothing starts the masked area from noise alone, latent noise from noise + its own seed
    noise, original from the encoded image. Both latent modes encode the same pixel-filled image, so
    outside the mask they start alike."""
    model = models.get("tiny-sd")
    first_inputs = {}
    for content in ("original", "latent noise", "latent nothing"):
        seen = []
        handle = model.pipe.unet.register_forward_pre_hook(lambda _m, args: seen.append(args[0][:1].clone()))
        try:
            render.render(model, [item(0, "inpaint", masked_content=content, mask_blur=0)], inputs.__getitem__)
        finally:
            handle.remove()
        first_inputs[content] = seen[0][0]
    mask = images.prepare_mask(inputs["store:mask"], (W, H), False, 0)
    # the latent mask as diffusers derives it: binarized at 0.5, nearest-downsampled
    condition = model.pipeline("inpaint").mask_processor.preprocess(mask, height=H, width=W)
    inside = torch.nn.functional.interpolate(condition, size=(H // 8, W // 8))[0, 0] > 0.5
    outside = ~inside
    orig, lnoise, nothing = (first_inputs[c] for c in ("original", "latent noise", "latent nothing"))
    assert torch.equal(lnoise[:, outside], nothing[:, outside])
    assert not torch.allclose(orig[:, inside], nothing[:, inside])
    # latent noise = latent nothing + the same seed noise: (1 + sigma) / sigma times it, everywhere inside.
    ratio = lnoise[:, inside] / nothing[:, inside]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-3)
    assert ratio.flatten()[0] > 1


# --- seeds and batches ----------------------------------------------------------------------------

def test_batch_plan_reproduces_bytes_and_batch_size_changes_only_rounding(models):
    """Kernels picked by batch size change the UNet's output by ~1e-6; the same batch plan gives
    the same bytes, another batch size gives the same image up to rounding. (Random-weight models
    amplify that rounding on some seeds: seed 7 at CFG 7 reaches 11/255 with Euler. The seeds here
    sit off such an edge; a farm that drew noise per batch position would differ everywhere.)"""
    model = models.get("tiny-sd")
    items = [item(i, seed=100 + i) for i in range(4)]
    batched = render.render(model, items, None)
    again = render.render(model, items, None)
    single = [render.render(model, [it], None)[0] for it in items]
    assert [a.tobytes() for a in batched] == [b.tobytes() for b in again]
    for a, b in zip(batched, single):
        assert np.abs(pixels(a) - pixels(b)).max() <= 2


def test_variation_seed_applies_in_img2img_and_inpaint(models, inputs):
    model = models.get("tiny-sd")
    for mode in ("img2img", "inpaint"):
        plain = render.render(model, [item(0, mode)], inputs.__getitem__)[0]
        zero = render.render(model, [item(0, mode, variation_seed=9, variation_strength=0.0)], inputs.__getitem__)[0]
        varied = render.render(model, [item(0, mode, variation_seed=9, variation_strength=0.5)], inputs.__getitem__)[0]
        assert plain.tobytes() == zero.tobytes()  # strength 0 is the seed's own noise
        assert varied.tobytes() != plain.tobytes()


def test_noise_depends_on_the_seed_alone_and_variation_blends_by_slerp():
    base = noise.item_noise(item(0, seed=5))
    assert torch.equal(base, noise.randn(5, (4, 8, 8)))
    assert torch.equal(noise.item_noise(item(3, seed=5)), base)
    zero = noise.item_noise(item(0, seed=5, variation_seed=9, variation_strength=0.0))
    full = noise.item_noise(item(0, seed=5, variation_seed=9, variation_strength=1.0))
    half = noise.item_noise(item(0, seed=5, variation_seed=9, variation_strength=0.5))
    assert torch.equal(zero, base)
    assert torch.allclose(full, noise.randn(9, (4, 8, 8)), atol=1e-5)
    assert not torch.allclose(half, base) and not torch.allclose(half, full)


def test_resize_seed_from_keeps_the_old_noise_in_the_centre():
    old = noise.randn(5, (4, 8, 8))
    grown = noise.item_noise(item(0, seed=5, width=128, height=96, resize_seed_from=(64, 64)))
    assert grown.shape == (4, 12, 16)
    assert torch.equal(grown[:, 2:10, 4:12], old)


# --- samplers: the traps measured in diffusers 0.42 -----------------------------------------------

def test_unipc_as_the_webui_runs_it_needs_sigma_min_as_final_sigma(models):
    model = models.get("tiny-sd")
    pipe = diffusers.StableDiffusionPipeline(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)
    latents = noise.randn(1, (1, 4, 8, 8))
    pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(model.scheduler_config, solver_type="bh1", solver_order=3)
    trap = pipe("x", num_inference_steps=20, width=W, height=H, latents=latents, output_type="np").images
    farm = render.render(model, [item(0, sampler="UniPC", steps=20, seed=1)], None)[0]
    assert np.isnan(trap).any()
    assert not np.isnan(np.asarray(farm, dtype=np.float32)).any() and np.asarray(farm).std() > 0


def test_ddim_never_clips_even_when_the_model_config_does_not_say():
    config = {k: v for k, v in SCHEDULER_CONFIG.items() if k != "clip_sample"}
    assert diffusers.DDIMScheduler.from_config(config).config.clip_sample is True  # the trap
    assert make_scheduler(config, "DDIM", "Automatic").config.clip_sample is False


def test_schedule_flags_that_diffusers_would_ignore_are_refused():
    assert "use_karras_sigmas" not in diffusers.EulerAncestralDiscreteScheduler.from_config(
        SCHEDULER_CONFIG, use_karras_sigmas=True).config  # the trap: silently ignored
    for name in ("Euler a", "DDIM", "PLMS", "LCM"):
        with pytest.raises(samplers.SamplerChoiceError, match="ignores the Karras schedule"):
            samplers.resolve(name, "Karras")


@pytest.mark.parametrize("sampler, schedule", list(accepted_combinations()))
def test_every_accepted_schedule_is_really_applied(sampler, schedule):
    scheduler = make_scheduler(SCHEDULER_CONFIG, sampler, schedule)
    _, concrete = samplers.resolve(sampler, schedule)
    for flag, value in samplers.SCHEDULE_FLAGS[concrete].items():
        assert scheduler.config[flag] == value


def test_dpm_sde_is_seeded_per_image_because_it_ignores_the_generators(models):
    model = models.get("tiny-sd")
    pipe = diffusers.StableDiffusionPipeline(**model.pipe.components)
    pipe.set_progress_bar_config(disable=True)

    def unseeded():
        pipe.scheduler = diffusers.DPMSolverSDEScheduler.from_config(model.scheduler_config, use_karras_sigmas=True)
        return pipe("x", num_inference_steps=4, width=W, height=H, latents=noise.randn(1, (1, 4, 8, 8)),
                    generator=torch.Generator().manual_seed(1)).images[0]

    assert unseeded().tobytes() != unseeded().tobytes()  # the trap: the generator does not reach its noise
    items = [item(i, sampler="DPM++ SDE", steps=4, seed=100 + i) for i in range(3)]
    batched = render.render(model, items, None)
    assert [a.tobytes() for a in batched] == [b.tobytes() for b in render.render(model, items, None)]
    alone = render.render(model, items[2:], None)[0]
    assert np.abs(pixels(alone) - pixels(batched[2])).max() <= 2  # its own tree, wherever it sits


# --- infotext for every mode ----------------------------------------------------------------------

@pytest.mark.parametrize("it, expected", [
    (item(0, sampler="DPM++ 2M", schedule_type="Karras", clip_skip=2, variation_seed=9, variation_strength=0.3),
     {"Sampler": "DPM++ 2M", "Schedule type": "Karras", "Clip skip": "2", "Variation seed": "9",
      "Variation seed strength": "0.3"}),
    (item(0, resize_seed_from=(512, 448)), {"Seed resize from-1": "512", "Seed resize from-2": "448"}),
    (item(0, "img2img", denoising_strength=0.55),
     {"Denoising strength": "0.55"}),
    (item(0, "inpaint", masked_content="latent noise", inpaint_area="only masked", padding=32, invert_mask=True),
     {"Mask blur": "4", "Masked content": "latent noise", "Inpaint area": "Only masked", "Masked area padding": "32",
      "Mask mode": "Inpaint not masked", "Denoising strength": "0.6"}),
])
def test_infotext_round_trip_for_every_mode(it, expected):
    text = infotext.for_item(it, model_name="tiny-sd", model_hash="0123456789", version="farm test")
    parsed = infotext.parse(text)
    assert parsed["Prompt"] == it.prompt and parsed["Negative prompt"] == it.negative_prompt
    assert (parsed["Seed"], parsed["Steps"], parsed["Size-1"], parsed["Model hash"]) == (
        str(it.seed), str(it.steps), str(it.width), "0123456789")
    for key, value in expected.items():
        assert parsed[key] == value
    keys = [k.removesuffix("-1") for k in parsed if k not in ("Prompt", "Negative prompt") and not k.endswith("-2")]
    order = [k for k in infotext.KEY_ORDER if k in keys]
    assert [k for k in keys if k in infotext.KEY_ORDER] == order
    assert keys[-1] == "Version"


# --- model files ----------------------------------------------------------------------------------

def test_pickle_checkpoint_is_refused_before_it_is_unpickled(models, tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ModelError, match="pickle checkpoint"):
        models.get(str(path))
    assert not marker.exists()


def test_inpainting_model_is_recognised(models):
    assert models.get("tiny-sd-inpaint").inpainting and not models.get("tiny-sd").inpainting


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(models):
    model = models.get("tiny-sd")
    pipe = model.pipe
    from workers import prompts

    with torch.inference_mode():
        tokens = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        out = pipe.text_encoder(tokens, output_hidden_states=True)
        skipped = prompts.Conditioner(pipe, clip_skip=2)(["a red circle"])
        plain = prompts.Conditioner(pipe, clip_skip=1)(["a red circle"])
        penultimate = pipe.text_encoder.final_layer_norm(out.hidden_states[-2])
    assert torch.equal(plain, out.last_hidden_state)
    assert torch.equal(skipped, penultimate)
    a = render.render(model, [item(0, clip_skip=1)], None)[0]
    b = render.render(model, [item(0, clip_skip=2)], None)[0]
    assert a.tobytes() != b.tobytes()


# --- hires fix and VAE override -------------------------------------------------------------------

@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_fix_renders_at_the_scaled_size_running_the_second_pass_steps(models, upscaler):
    model = models.get("tiny-sd")
    calls = []
    handle = model.pipe.unet.register_forward_pre_hook(lambda _m, args: calls.append(tuple(args[0].shape[-2:])))
    try:
        out = render.render(model, [item(0, steps=5, hires=HiresPass(upscaler, 1.5, 3, 0.6))], None)[0]
    finally:
        handle.remove()
    assert out.size == (96, 96)
    assert calls == [(8, 8)] * 5 + [(12, 12)] * 3
    plain = render.render(model, [item(0, steps=5)], None)[0]
    assert plain.size == (64, 64)


def test_vae_override_changes_the_decoder_and_is_recorded(models, tmp_path):
    from workers.tiny import build_tiny_pipeline

    torch.manual_seed(1)
    other = build_tiny_pipeline().vae
    torch.manual_seed(2)
    for p in other.decoder.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    other.save_pretrained(tmp_path / "my-vae")
    model = models.get("tiny-sd")
    vae = models.vae(str(tmp_path / "my-vae"))
    with_override = render.render(model, [item(0)], None, vae)[0]
    without = render.render(model, [item(0)], None)[0]
    assert with_override.tobytes() != without.tobytes()
    assert render.render(model, [item(0)], None)[0].tobytes() == without.tobytes()  # the model's own VAE is back
    params = infotext.parse(infotext.for_item(item(0, vae=str(tmp_path / "my-vae")), model_name="tiny-sd",
                                              model_hash="0123456789", vae_name=vae.name, vae_hash=vae.hash,
                                              version="farm test"))
    assert params["VAE"] == "my-vae" and len(params["VAE hash"]) == 10


def test_latent_upscale_resize_mode_renders_at_the_target_size(models, inputs):
    model = models.get("tiny-sd")
    out = render.render(model, [item(0, "img2img", resize_mode=3, width=128, height=64),
                                item(1, "img2img", resize_mode=3, width=128, height=64)], inputs.__getitem__)
    assert [o.size for o in out] == [(128, 64)] * 2
    assert out[0].tobytes() != out[1].tobytes()
    stretched = render.render(model, [item(0, "img2img", resize_mode=0, width=128, height=64)], inputs.__getitem__)[0]
    assert stretched.tobytes() != out[0].tobytes()


def test_pipelines_for_other_modes_keep_the_models_dtype(cache_dir):
    """diffusers' from_pipe casts shared modules to float32 by default: an fp16 model on a GPU
    silently became fp32 (and rendered differently) after its first img2img chunk."""
    model = ModelCache(cache_dir, torch.device("cpu"), torch.bfloat16).get("tiny-sd")
    for mode in ("img2img", "inpaint"):
        model.pipeline(mode)
    assert {model.pipe.unet.dtype, model.pipe.vae.dtype, model.pipe.text_encoder.dtype} == {torch.bfloat16}
