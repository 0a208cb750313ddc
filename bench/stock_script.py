"""What a user writes instead of the farm: the stock diffusers pipeline in a loop, saving PNGs.

    python -m bench.stock_script MODEL_DIR OUT_DIR --prompts-file P --seeds 1 12 --batch-size 8

`--batch-size 1` is the naive script (one image per call); 8 is the one written by a user
who knows to batch, with a list of per-image generators. Either way each image's starting
noise is drawn from its own seed (`latents=`), as the farm and the webui draw it, and the
sampler's noise from a fresh generator per image, so the same seed and batch give the
same pixels as the farm. Only torch and diffusers are imported: nothing of the farm.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

T0 = time.perf_counter()

import torch  # noqa: E402
from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--prompts-file", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs=2, metavar=("START", "COUNT"), required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--cfg-scale", type=float, default=7.0)
    args = parser.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.model, dtype=torch.float32, safety_checker=None)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    scale = pipe.vae_scale_factor
    prompts = [p for p in args.prompts_file.read_text().splitlines() if p.strip()]
    start, count = args.seeds
    work = [(prompt, seed) for prompt in prompts for seed in range(start, start + count)]
    args.out.mkdir(parents=True, exist_ok=True)
    loaded = time.perf_counter()
    for at in range(0, len(work), args.batch_size):
        batch = work[at:at + args.batch_size]
        seeds = [seed for _, seed in batch]
        latents = torch.stack([
            torch.randn((4, args.size // scale, args.size // scale), generator=torch.Generator().manual_seed(s))
            for s in seeds])
        images = pipe([p for p, _ in batch], negative_prompt=[""] * len(batch), latents=latents,
                      generator=[torch.Generator().manual_seed(s) for s in seeds], num_inference_steps=args.steps,
                      guidance_scale=args.cfg_scale, width=args.size, height=args.size).images
        for offset, image in enumerate(images):
            image.save(args.out / f"{at + offset:06d}.png")
    done = time.perf_counter()
    print(f"{len(work)} images in {done - T0:.2f} s after the interpreter started: imports and model load "
          f"{loaded - T0:.2f} s, rendering and saving {done - loaded:.2f} s")


if __name__ == "__main__":
    main()
