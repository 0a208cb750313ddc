"""Train `shapes-sd` from scratch on this machine's CPU, with a fixed seed.

    python -m workers.shapes.train --out /tmp/shapes-sd

Three stages, each printing progress and an ETA: the VAE on pictures of the world,
then the world's latents are encoded once, then the UNet and the text encoder together
on those latents (epsilon prediction on SD1's noise schedule, min-SNR weighting, 10% of
captions empty for classifier-free guidance, an EMA of the weights). The result is a
diffusers folder in fp16 safetensors; at the end the quality figures are measured on it
(`workers.shapes.quality`). About 50 minutes on two cores with the defaults.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from workers.shapes import vocabulary, world
from workers.tiny import SCHEDULER_CONFIG

SEED = 20261126
TEXT_WIDTH = 128


@dataclass(frozen=True)
class Schedule:
    vae_steps: int = 3000
    vae_batch: int = 24
    latents: int = 60_000
    unet_steps: int = 6000
    unet_batch: int = 64
    lr: float = 1e-3
    warmup: int = 300
    ema: float = 0.999


QUICK = Schedule(vae_steps=300, latents=4000, unet_steps=300, warmup=50, ema=0.99)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
                         layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=world.SIZE)


def build_unet():
    from diffusers import UNet2DConditionModel

    # No attention at the full latent resolution: it costs most of the time and the
    # prompt is read well enough at 8x8 and 4x4.
    return UNet2DConditionModel(sample_size=world.SIZE // 4, in_channels=4, out_channels=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=4,
                                cross_attention_dim=TEXT_WIDTH, norm_num_groups=16)


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=vocabulary.MAX_LENGTH, vocab_size=len(tokenizer), hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))


class Progress:
    """One line per report: step, loss, elapsed and ETA."""

    def __init__(self, stage: str, total: int, every: int):
        self.stage, self.total, self.every = stage, total, every
        self.started = time.perf_counter()
        self.losses: list[float] = []

    def step(self, i: int, loss: float) -> None:
        self.losses.append(loss)
        if (i + 1) % self.every and i + 1 != self.total:
            return
        elapsed = time.perf_counter() - self.started
        eta = elapsed / (i + 1) * (self.total - i - 1)
        mean = sum(self.losses) / len(self.losses)
        self.losses.clear()
        print(f"{self.stage} {i + 1}/{self.total} loss {mean:.4f}  {_clock(elapsed)} elapsed, "
              f"ETA {_clock(eta)}", flush=True)


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def cosine_lr(optimizer, step: int, s: Schedule, total: int) -> None:
    if step < s.warmup:
        scale = (step + 1) / s.warmup
    else:
        scale = 0.5 * (1 + math.cos(math.pi * (step - s.warmup) / max(1, total - s.warmup)))
    for group in optimizer.param_groups:
        group["lr"] = s.lr * max(scale, 0.02)


def train_vae(vae, rng: np.random.Generator, s: Schedule):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=s.lr, weight_decay=0.0)
    progress = Progress("vae", s.vae_steps, 100)
    vae.train()
    for i in range(s.vae_steps):
        cosine_lr(optimizer, i, s, s.vae_steps)
        x = to_tensor(world.batch(rng, s.vae_batch)[0])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(i, loss.item())
    return vae.eval()


@torch.no_grad()
def check_vae(vae, count: int = 200) -> None:
    """Read back the VAE's reconstructions of fresh pictures as the quality script reads images."""
    from workers.shapes import analysis

    rng = np.random.default_rng(SEED + 1)
    pixels, _, scenes = world.batch(rng, count)
    recon = vae.decode(vae.encode(to_tensor(pixels)).latent_dist.mean).sample
    recon = recon.add(1).mul(127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    colour = kind = 0
    ious = []
    for scene, original, copy_ in zip(scenes, pixels, recon):
        a, b = analysis.read(Image.fromarray(original)), analysis.read(Image.fromarray(copy_))
        colour += a.colour == b.colour and a.background == b.background
        kind += a.kind == b.kind
        ious.append(analysis.iou(a.mask, b.mask))
    print(f"vae reconstructions of {count} pictures: colours kept {colour / count:.1%}, shape class kept "
          f"{kind / count:.1%}, mask IoU median {np.median(ious):.3f}, mean abs error "
          f"{np.abs(recon.astype(float) - pixels).mean():.2f}/255", flush=True)


@torch.no_grad()
def encode_world(vae, rng: np.random.Generator, count: int) -> tuple[torch.Tensor, list[world.Scene]]:
    latents, scenes = [], []
    progress = Progress("encode", math.ceil(count / 256), 50)
    for i in range(0, count, 256):
        pixels, _, batch_scenes = world.batch(rng, min(256, count - i))
        latents.append(vae.encode(to_tensor(pixels)).latent_dist.mean)
        scenes += batch_scenes
        progress.step(i // 256, 0.0)
    return torch.cat(latents), scenes


def min_snr_weights(alphas: torch.Tensor, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    snr = alphas[timesteps] / (1 - alphas[timesteps])
    return torch.clamp(snr, max=gamma) / snr


def train_denoiser(unet, text_encoder, tokenizer, latents: torch.Tensor, scenes: list[world.Scene],
                   rng: np.random.Generator, s: Schedule):
    from diffusers import DDPMScheduler

    noise_schedule = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = noise_schedule.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    generator = torch.Generator().manual_seed(SEED)
    progress = Progress("unet", s.unet_steps, 100)
    unet.train()
    text_encoder.train()
    for i in range(s.unet_steps):
        cosine_lr(optimizer, i, s, s.unet_steps)
        pick = rng.integers(0, len(scenes), s.unet_batch)
        captions = [world.caption(scenes[j], rng) for j in pick]
        ids = tokenizer(captions, padding="max_length", max_length=vocabulary.MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        clean = latents[torch.from_numpy(pick)]
        # Offset noise: lets the model move a picture's overall colour, which a plain
        # background is nearly all of.
        noise = torch.randn(clean.shape, generator=generator)
        noise += 0.1 * torch.randn((clean.shape[0], clean.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (s.unet_batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, t)
        predicted = unet(noisy, t, text_encoder(ids)[0]).sample
        per_item = F.mse_loss(predicted, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_item * min_snr_weights(alphas, t)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        _ema(ema_unet, unet, s.ema if i >= s.warmup else 0.0)
        _ema(ema_text, text_encoder, s.ema if i >= s.warmup else 0.0)
        progress.step(i, per_item.mean().item())
    return ema_unet, ema_text


@torch.no_grad()
def _ema(average, model, decay: float) -> None:
    for a, p in zip(average.parameters(), model.parameters()):
        a.lerp_(p, 1 - decay)


def save(out: Path, vae, unet, text_encoder, tokenizer, scaling_factor: float) -> None:
    """A diffusers folder in fp16 (copies: training goes on in float32)."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    vae, unet, text_encoder = (copy.deepcopy(m).to(torch.float16) for m in (vae, unet, text_encoder))
    vae.register_to_config(scaling_factor=scaling_factor)
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def train(out: Path, s: Schedule) -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(SEED)
    tokenizer = vocabulary.build_tokenizer()
    vae, unet, text_encoder = build_vae(), build_unet(), build_text_encoder(tokenizer)
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in
             (("vae", vae), ("unet", unet), ("text encoder", text_encoder))}
    print("parameters: " + ", ".join(f"{n} {v / 1e6:.2f}M" for n, v in sizes.items()), flush=True)
    started = time.perf_counter()
    vae = train_vae(vae, rng, s)
    check_vae(vae)
    latents, scenes = encode_world(vae, rng, s.latents)
    scaling_factor = float(1 / latents.std())
    print(f"latent std {latents.std():.3f}: scaling factor {scaling_factor:.4f}", flush=True)
    unet, text_encoder = train_denoiser(unet, text_encoder, tokenizer, latents * scaling_factor, scenes, rng, s)
    save(out, vae, unet, text_encoder, tokenizer, scaling_factor)
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    print(f"saved {out} ({weights / 1e6:.1f} MB of weights) after {_clock(time.perf_counter() - started)}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the diffusers model to")
    parser.add_argument("--quick", action="store_true", help="a few minutes: checks the stages, learns little")
    parser.add_argument("--no-quality", action="store_true", help="skip measuring the result")
    parser.add_argument("--vae-steps", type=int, help="override the VAE's training steps")
    parser.add_argument("--unet-steps", type=int, help="override the UNet's training steps")
    args = parser.parse_args()
    schedule = QUICK if args.quick else Schedule()
    overrides = {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps}
    train(args.out, replace(schedule, **{k: v for k, v in overrides.items() if v}))
    if not args.no_quality:
        from workers.shapes import quality

        quality.report(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
