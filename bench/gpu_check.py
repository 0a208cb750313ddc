"""GPU check: the worker's render paths on CUDA in fp16, and packing against a batch-1 loop
with an SD1.5-shaped pipeline (random weights from its known configuration).

    python -m bench.gpu_check [--images 16] [--batch-size 8] [--steps 30] [--size 512]

Part 1 renders every mode on the tiny model on the GPU and checks what must hold there
(finite pixels, inpaint keeping every pixel outside the mask, the same batch giving the
same bytes). Part 2 prints images/s for the plain loop and for packed batches, peak GPU
memory, and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from farm.plan import Item
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
                         ("txt2img", dict(hires=("Latent", 1.5, 4, 0.6))), ("img2img", {}),
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
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    print(f"SD1.5-shaped pipeline: UNet {params:.0f}M parameters, fp16, SDPA attention, channels-last UNet")
    return LoadedModel("sd15-shaped", "sd15-shaped", "", Path("."), pipe, dict(pipe.scheduler.config), own_vae=pipe.vae)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def throughput(model: LoadedModel, count: int, batch: int, steps: int, size: int) -> None:
    items = [item(i, steps=steps, width=size, height=size, model="sd15-shaped") for i in range(count)]
    render.render(model, items[:1], None)  # warm up kernels
    render.render(model, items[:batch], None)
    _sync()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for it in items:
        render.render(model, [it], None)
    _sync()
    loop = count / (time.perf_counter() - started)
    loop_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for start in range(0, count, batch):
        render.render(model, items[start:start + batch], None)
    _sync()
    packed = count / (time.perf_counter() - started)
    packed_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{count} images {size}x{size}, {steps} steps, Euler a, CFG 7, {where}")
    print(f"batch-1 loop:        {loop:6.2f} images/s  peak {loop_mem:5.1f} GiB")
    print(f"packed (batch {batch:2d}):  {packed:6.2f} images/s  peak {packed_mem:5.1f} GiB")
    print(f"ratio packed/loop: {packed / loop:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    smoke(device)
    throughput(sd15_shaped(device), args.images, args.batch_size, args.steps, args.size)


if __name__ == "__main__":
    main()
