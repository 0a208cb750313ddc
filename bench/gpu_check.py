"""GPU check: the worker's render paths on CUDA in fp16, and packing against a batch-1 loop
with an SD1.5-shaped pipeline (random weights from its known configuration).

    python -m bench.gpu_check [--images 16] [--batch-size 8] [--steps 30] [--size 512]

Part 1 renders every mode on the tiny model on the GPU and checks what must hold there
(finite pixels, inpaint keeping every pixel outside the mask, the same batch giving the
same bytes). Part 2 prints images/s and peak GPU memory for the stock pipeline called
once per image, then for the worker's render path: batch 1 and packed, on channels-last
weights (as workers load models on CUDA), then packed with torch.compile (FARM_COMPILE=1),
each with its ratio to the loop, all in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from farm.plan import HiresPass, Item
from workers import images, render
from workers.device import dtype_for
from workers.models import LoadedModel, ModelCache


def item(i: int, mode: str = "txt2img", **changes) -> Item:
    fields = dict(index=i, prompt="a red circle", negative_prompt="", seed=100 + i, model="tiny-sd", mode=mode,
                  sampler="Euler a", schedule_type="Automatic", steps=10, cfg_scale=7.0, width=64, height=64)
    if mode != "txt2img":
        fields.update(init_image="store:init", denoising_strength=0.6)
    if mode == "inpaint":
        fields.update(mask="store:mask", mask_blur=4, masked_content="original", inpaint_area="whole", padding=8)
    fields.update(changes)
    return Item(**fields)


def smoke(device: torch.device) -> None:
    init = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(init).ellipse((20, 10, 60, 50), fill="red")
    mask = Image.new("L", (96, 64), 0)
    ImageDraw.Draw(mask).rectangle((30, 20, 60, 45), fill=255)
    fetch = {"store:init": init, "store:mask": mask}.__getitem__
    with tempfile.TemporaryDirectory() as tmp:
        cache = ModelCache(Path(tmp), device, dtype_for(device))
        for name in ("tiny-sd", "tiny-sd-inpaint"):
            model = cache.get(name)
            cases = [("inpaint", dict(model=name, masked_content=c, inpaint_area=a))
                     for c in ("fill", "original", "latent noise", "latent nothing") for a in ("whole", "only masked")]
            if name == "tiny-sd":
                cases = [("txt2img", {}), ("txt2img", dict(sampler="DPM++ 2M", schedule_type="Karras", clip_skip=2)),
                         ("txt2img", dict(hires=HiresPass("Latent", 1.5, 4, 0.6))), ("img2img", {}),
                         ("img2img", dict(resize_mode=3, width=128))] + cases
            for mode, changes in cases:
                batch = [item(0, mode, **changes), item(1, mode, **changes)]
                out = render.render(model, batch, fetch)
                again = render.render(model, batch, fetch)
                finite = all(np.isfinite(np.asarray(o, dtype=np.float32)).all() for o in out)
                same = all(a.tobytes() == b.tobytes() for a, b in zip(out, again))
                note = ""
                if mode == "inpaint":
                    only = changes["inpaint_area"] == "only masked"
                    original = init if only else images.resize_image(0, init, 64, 64)
                    keep = np.asarray(images.prepare_mask(mask, original.size, False, 4)) == 0
                    kept = (np.asarray(out[0])[keep] == np.asarray(original)[keep]).all()
                    note = f" outside-mask-exact={kept}"
                print(f"{name:16s} {mode:8s} {changes} size={out[0].size} finite={finite} rerun-identical={same}{note}")


def sd15_shaped(device: torch.device) -> LoadedModel:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from workers.tiny import SCHEDULER_CONFIG, clip_byte_vocab

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, sample_size=64)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            sample_size=512)
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, vocab_size=49408,
                                            hidden_act="quick_gelu"))
    vocab, merges = clip_byte_vocab()
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text,
                                   tokenizer=CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77),
                                   scheduler=EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipe.to(device, dtype_for(device))
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"SD1.5-shaped pipeline: UNet {params:.0f}M parameters, {pipe.unet.dtype}, SDPA attention")
    return LoadedModel("sd15-shaped", "sd15-shaped", "", Path("."), pipe, dict(pipe.scheduler.config), own_vae=pipe.vae)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(label: str, count: int, run, baseline: float | None = None) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run()
    _sync()
    rate = count / (time.perf_counter() - started)
    memory = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    ratio = f"  {rate / baseline:5.2f}x the loop" if baseline else ""
    print(f"{label:44s} {rate:6.2f} images/s  peak {memory:5.1f} GiB{ratio}", flush=True)
    return rate


def throughput(model: LoadedModel, count: int, batch: int, steps: int, size: int, compile_unet: bool) -> None:
    """The plain loop (the stock pipeline called once per image) against the worker's render path:
    packed batches on channels-last weights, then the same with torch.compile."""
    from workers.models import optimize_for_device

    pipe = model.pipe
    items = [item(i, steps=steps, width=size, height=size, model="sd15-shaped") for i in range(count)]
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"{count} images {size}x{size}, {steps} steps, Euler a, CFG 7, {where}")

    def plain_loop():
        for it in items:
            pipe(it.prompt, num_inference_steps=steps, width=size, height=size, guidance_scale=7.0,
                 generator=torch.Generator(pipe.device).manual_seed(it.seed))

    def farm(batch_size):
        def run():
            for start in range(0, count, batch_size):
                render.render(model, items[start:start + batch_size], None)
        return run

    pipe(items[0].prompt, num_inference_steps=2, width=size, height=size)  # warm up kernels
    loop = _timed("plain loop (stock pipeline, batch 1)", count, plain_loop)
    optimize_for_device(pipe, pipe.device)
    farm(batch)()  # warm up the packed shape
    _timed("farm render path, batch 1, channels-last", count, farm(1), loop)
    _timed(f"farm render path, batch {batch}, channels-last", count, farm(batch), loop)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)
        started = time.perf_counter()
        farm(batch)()
        _sync()
        print(f"torch.compile warm-up (first batch of {batch}): {time.perf_counter() - started:.0f} s", flush=True)
        _timed(f"farm render path, batch {batch}, channels-last, compiled", count, farm(batch), loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--skip-smoke", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    if not args.skip_smoke:
        smoke(device)
    throughput(sd15_shaped(device), args.images, args.batch_size, args.steps, args.size, not args.no_compile)


if __name__ == "__main__":
    main()
