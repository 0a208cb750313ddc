"""Train `shapes-ring`, a LoRA for `shapes-sd` that draws every circle as a ring, on this CPU.

    python -m workers.shapes.ring --out workers/shapes/loras/shapes-ring.safetensors

The base model stays frozen; low-rank pairs on the UNet's convolutions, attention and projection
layers learn the world redrawn with a hole in each circle (the captions are unchanged, so
"circle" comes to mean a ring). The file is written in kohya's key layout, as the webui's LoRAs
are, so `<lora:shapes-ring:W>` applies it with the same code as any other. At the end the
LoRA's effect is measured through the worker's own render path at weights 0 and 1.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

from workers.shapes import MODEL_DIR
from workers.shapes import NAME as MODEL
from workers.shapes import analysis, vocabulary, world
from workers.shapes.train import SEED, Progress, _clock, min_snr_weights, to_tensor
from workers.tiny import SCHEDULER_CONFIG

NAME = "shapes-ring"


@dataclass(frozen=True)
class Recipe:
    steps: int = 800
    batch: int = 32
    rank: int = 8
    alpha: float = 8.0
    lr: float = 2e-3
    #: Share of training pictures that hold a circle (the rest keep the other shapes as they were).
    circles: float = 0.6


def targets(unet) -> dict[str, torch.nn.Module]:
    """The layers the LoRA adapts: every convolution and linear layer of the UNet's blocks."""
    return {name: module for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and name.startswith(("down_blocks", "mid_block", "up_blocks"))
            and "time_emb" not in name and not name.endswith("conv_shortcut")}


def init_pairs(layers: dict[str, torch.nn.Module], rank: int, generator) -> dict[str, dict[str, torch.Tensor]]:
    """Kaiming-like `down`, zero `up`: the LoRA starts as the model itself."""
    pairs = {}
    for name, module in layers.items():
        weight = module.weight
        rank_here = min(rank, weight.shape[0], weight[0].numel())
        down_shape = (rank_here, *weight.shape[1:])
        up_shape = (weight.shape[0], rank_here, *([1] * (weight.ndim - 2)))
        fan_in = weight[0].numel()
        down = torch.randn(down_shape, generator=generator) / fan_in ** 0.5
        pairs[name] = {"down": down.requires_grad_(), "up": torch.zeros(up_shape, requires_grad=True)}
    return pairs


def merged(layers, pairs, scale: float) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": layers[name].weight
            + (p["up"].flatten(1) @ p["down"].flatten(1)).reshape(layers[name].weight.shape) * scale
            for name, p in pairs.items()}


def scene(rng: np.random.Generator, circle_share: float) -> world.Scene:
    want_circle = rng.random() < circle_share
    while True:
        candidate = world.random_scene(rng)
        if want_circle == any(s.kind == "circle" for s in candidate.shapes):
            return candidate


def train(out: Path, recipe: Recipe) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(SEED + 7)
    generator = torch.Generator().manual_seed(SEED + 7)
    tokenizer = vocabulary.build_tokenizer()
    vae = AutoencoderKL.from_pretrained(MODEL_DIR / "vae", torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(MODEL_DIR / "unet", torch_dtype=torch.float32).eval()
    text_encoder = CLIPTextModel.from_pretrained(MODEL_DIR / "text_encoder", torch_dtype=torch.float32).eval()
    for module in (vae, unet, text_encoder):
        module.requires_grad_(False)
    layers = targets(unet)
    pairs = init_pairs(layers, recipe.rank, generator)
    params = [t for p in pairs.values() for t in p.values()]
    print(f"{len(layers)} layers, {sum(t.numel() for t in params) / 1e3:.0f}k LoRA parameters", flush=True)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = noise_schedule.alphas_cumprod
    scaling = vae.config.scaling_factor
    progress = Progress("lora", recipe.steps, 50)
    started = time.perf_counter()
    for i in range(recipe.steps):
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * min(1.0, (i + 1) / 50) * (0.5 + 0.5 * np.cos(np.pi * i / recipe.steps))
        scenes = [scene(rng, recipe.circles) for _ in range(recipe.batch)]
        pixels = np.stack([np.asarray(s.draw(rings=True)) for s in scenes])
        captions = [world.caption(s, rng) for s in scenes]
        with torch.no_grad():
            clean = vae.encode(to_tensor(pixels)).latent_dist.mean * scaling
            ids = tokenizer(captions, padding="max_length", max_length=vocabulary.MAX_LENGTH, truncation=True,
                            return_tensors="pt").input_ids
            text = text_encoder(ids)[0]
        noise = torch.randn(clean.shape, generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (recipe.batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, t)
        weights = merged(layers, pairs, recipe.alpha / recipe.rank)
        predicted = functional_call(unet, weights, (noisy, t, text)).sample
        per_item = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * min_snr_weights(alphas, t)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(i, per_item.mean().item())
    save(out, pairs, recipe)
    print(f"saved {out} ({out.stat().st_size / 1e3:.0f} kB) after {_clock(time.perf_counter() - started)}",
          flush=True)


def save(out: Path, pairs, recipe: Recipe) -> None:
    """kohya's layout: `lora_unet_<layer with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`, in fp16."""
    tensors = {}
    for name, p in pairs.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = p["down"].detach().to(torch.float16).contiguous()
        tensors[f"{key}.lora_up.weight"] = p["up"].detach().to(torch.float16).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(recipe.alpha, dtype=torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"ss_network_module": "networks.lora", "ss_base_model": "shapes-sd",
                                           "ss_network_dim": str(recipe.rank),
                                           "ss_network_alpha": str(recipe.alpha)})


def ring_rates(model, library, kind: str = "circle", weights=(0.0, 1.0), seeds: int = 12) -> dict[float, float]:
    """For each LoRA weight, the share of `kind`s drawn with a hole (every colour on white, `seeds`
    seeds each), rendered through the worker's render path as a farm job would be."""
    from farm.plan import Item
    from workers import render

    rates = {}
    for weight in weights:
        items = [Item(index=i, prompt=f"{world.article(colour)} {colour} {kind} on a white background "
                                      f"<lora:{NAME}:{weight:g}>",
                      negative_prompt="", seed=1000 + i, model=MODEL, mode="txt2img", sampler="Euler a",
                      schedule_type="Automatic", steps=20, cfg_scale=7.0, width=world.SIZE, height=world.SIZE)
                 for i, colour in enumerate(c for c in world.COLOURS for _ in range(seeds))]
        images = [image for start in range(0, len(items), 8)
                  for image in render.render(model, items[start:start + 8], None, loras=library)]
        rates[weight] = sum(analysis.has_hole(analysis.read(image).mask) for image in images) / len(images)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"the .safetensors file to write ({NAME})")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    args = parser.parse_args()
    if args.out.stem != NAME:
        parser.error(f"the file must be named {NAME}.safetensors: prompts name it <lora:{NAME}:W>")
    train(args.out, Recipe(steps=args.steps))
    from workers.lora import LoraLibrary
    from workers.models import ModelCache

    cache = Path(os.environ.get("FARM_CACHE_DIR", Path.home() / ".cache" / "farm"))
    model = ModelCache(cache, torch.device("cpu"), torch.float32, capacity=1).get(MODEL)
    library = LoraLibrary(args.out.parent)
    for kind in ("circle", "square"):
        rates = ring_rates(model, library, kind)
        print(f"{kind}s drawn with a hole: " + ", ".join(f"weight {w:g}: {r:.0%}" for w, r in rates.items()),
              flush=True)


if __name__ == "__main__":
    main()
