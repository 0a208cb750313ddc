"""Single-file checkpoints: which Stable Diffusion family a .safetensors file holds.

Read from the safetensors header alone (a length and a JSON table of names and shapes),
so nothing is loaded and no GPU stack is needed. The rules are the webui's
(`sd_models_config.py`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from farm.errors import ModelError

#: Families farm can load from a single file, with the config folder each needs.
SUPPORTED = ("sd1", "sd1-inpainting", "sd2", "sd2-inpainting", "sdxl", "sdxl-inpainting")
MAX_HEADER_BYTES = 100 * 1024 * 1024

_SDXL_KEY = "conditioner.embedders.1.model.ln_final.weight"
_SD2_KEY = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"


@dataclass(frozen=True)
class Family:
    base: str          # sd1 | sd2 | sdxl
    inpainting: bool

    @property
    def name(self) -> str:
        return self.base + ("-inpainting" if self.inpainting else "")

    @property
    def supported(self) -> bool:
        return self.name in SUPPORTED


def header(path: Path) -> dict:
    """The safetensors header: tensor name -> {dtype, shape, data_offsets}."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ModelError(f"{path.name} is not a safetensors file (header of {length} bytes)")
            table = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path.name} is not a readable safetensors file: {e}") from None
    table.pop("__metadata__", None)
    return table


def detect(path: Path) -> Family:
    """The family of a .safetensors checkpoint, from its header."""
    return family_from_shapes({name: entry["shape"] for name, entry in header(path).items()}, path.name)


def family_from_shapes(shapes: dict, name: str) -> Family:
    """The webui's rules, over tensor names and shapes."""
    if _UNET_IN not in shapes:
        raise ModelError(f"{name} holds no Stable Diffusion UNet in the original (LDM) key layout")
    inpainting = shapes[_UNET_IN][1] == 9
    if _SDXL_KEY in shapes:
        return Family("sdxl", inpainting)
    if _SD2_KEY in shapes and shapes[_SD2_KEY][1] == 1024:
        return Family("sd2", inpainting)
    return Family("sd1", inpainting)
