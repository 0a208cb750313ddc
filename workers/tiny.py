"""The built-in `tiny-sd` model: an SD1-shaped pipeline with seeded random weights.

It is built from configs once per cache folder and saved as an ordinary diffusers
folder in safetensors, so every later load goes through `from_pretrained` exactly
as a user's own model folder does. It draws noise, not pictures: it exists to
exercise the whole path quickly on a CPU.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from farm.spec import TINY_SD, TINY_SD_INPAINT

#: The built-in models this module builds (farm.spec.BUILTIN_MODELS lists them all).
TINY_MODELS = (TINY_SD, TINY_SD_INPAINT)

# Bumped whenever the configs below change, so a stale cached build is not reused.
_BUILD_VERSION = "1"
_SEED = 20261126

SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def builtin_model_dir(name: str, cache_dir: Path) -> Path:
    """Return the folder of a built-in model, building it on first use."""
    target = cache_dir / "models" / f"{name}-v{_BUILD_VERSION}"
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build_tiny_pipeline(inpainting=(name == TINY_SD_INPAINT)).save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:
            # Another worker on this host finished the same build first.
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def clip_byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A CLIP-layout BPE vocabulary over bytes alone: every text tokenizes, none learned."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, []


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_tiny_pipeline(inpainting: bool = False, layers_per_block: int = 1, text_width: int = 32):
    """`text_width` 1024 gives an SD2-shaped text encoder (what identifies SD2 in a checkpoint)."""
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if inpainting else 4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=layers_per_block,
        attention_head_dim=8,
        cross_attention_dim=text_width,
        norm_num_groups=32,
        use_linear_projection=text_width != 32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )
    vocab, merges = clip_byte_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=text_width,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            vocab_size=len(vocab),
            hidden_act="quick_gelu" if text_width == 32 else "gelu",
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
    )
    scheduler = EulerAncestralDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
