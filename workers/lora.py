"""LoRA, applied as the webui v1.10.1's Lora network applies it (`extensions-builtin/Lora`): each
layer's weight gains `up @ down * (alpha / rank) * multiplier` (the text encoders' multiplier for
their layers, the UNet's for its), every LoRA of the set in the prompt's order, and the original
weights come back before another set is applied.

Two key layouts are read: kohya's (the webui's: `lora_unet_down_blocks_0_..._to_q.lora_down.weight`,
`lora_te_text_model_...`, SDXL's `lora_te1_`/`lora_te2_`, with `.alpha`), and diffusers' own
(`unet.down_blocks.0....to_q.lora_A.weight`, `text_encoder.text_model....`, or `.lora.down.weight`).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from farm import loras
from farm.errors import ModelError
from farm.plan import Item
from farm.prompts import LoraRef
from farm.spec import STORE_PREFIX

#: The job-supplied LoRA files a worker keeps read, by store key.
KEEP_STORED = 8

_KOHYA = re.compile(r"^lora_(unet|te|te1|te2)_(.+)\.(lora_down|lora_up|alpha)(?:\.weight)?$")
_DIFFUSERS = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)\.weight$")
_PART = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
         "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_ROLE = {"lora_down": "down", "lora_A": "down", "lora.down": "down", "lora_up": "up", "lora_B": "up",
         "lora.up": "up", "alpha": "alpha"}


@dataclass
class LoraFile:
    """A LoRA's layers, by (pipeline part, layer name with "_" for "."), as read from its file."""

    name: str
    shorthash: str
    layers: dict[tuple[str, str], dict[str, torch.Tensor]]

    @classmethod
    def read(cls, path: Path) -> "LoraFile":
        return cls.parse(path.stem, path.read_bytes(), path.name)

    @classmethod
    def parse(cls, name: str, data: bytes, source: str) -> "LoraFile":
        try:
            tensors = load(data)
        except (SafetensorError, ValueError) as e:
            raise ModelError(f"<lora:{name}>: {source} is not a readable .safetensors file ({e})") from None
        layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            kohya, diffusers = _KOHYA.match(key), _DIFFUSERS.match(key)
            if kohya:
                part, layer, role = _PART[kohya.group(1)], kohya.group(2), _ROLE[kohya.group(3)]
            elif diffusers:
                part, role = _PART[diffusers.group(1)], _ROLE[diffusers.group(3)]
                layer = diffusers.group(2).replace(".", "_")
            else:
                continue
            layers.setdefault((part, layer.removeprefix("text_model_")), {})[role] = tensor
        if not layers:
            raise ModelError(f"{source} holds no LoRA layers in a layout farm reads (kohya's or diffusers')")
        return cls(name, hashlib.sha256(data).hexdigest()[:12], layers)


def delta(layer: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The layer's `up @ down`, scaled by alpha / rank, in the weight's shape and dtype."""
    down, up = layer["down"].to(weight), layer["up"].to(weight)
    rank = down.shape[0]
    scale = float(layer["alpha"]) / rank if "alpha" in layer else 1.0
    product = up.flatten(1) @ down.flatten(1)
    return product.reshape(weight.shape) * scale


@dataclass
class LoraLibrary:
    """The operator's LoRA folder (and farm's own), read once per file and kept (a worker reuses
    them), and the LoRA files jobs bring in their store, by key."""

    folder: Path | None
    _files: dict[str, LoraFile] = field(default_factory=dict)
    _stored: OrderedDict[str, LoraFile] = field(default_factory=OrderedDict)

    def fetch(self, items: Iterable[Item], read: Callable[[str], bytes]) -> None:
        """Read the job's own LoRA files that these items name (`read` gets a store key's bytes)."""
        for item in items:
            for name, ref in item.loras:
                key = ref.removeprefix(STORE_PREFIX)
                if key in self._stored:
                    self._stored.move_to_end(key)
                    continue
                self._stored[key] = LoraFile.parse(name, read(key), key)
                while len(self._stored) > KEEP_STORED:
                    self._stored.popitem(last=False)

    def get(self, name: str, source: str | None = None) -> LoraFile:
        """The LoRA a prompt names: the job's own file when `source` (its store: key) is given."""
        if source is not None:
            key = source.removeprefix(STORE_PREFIX)
            if key not in self._stored:
                raise ModelError(f"<lora:{name}>: the job's file {key} was not fetched from the store")
            return self._stored[key]
        if name not in self._files:
            try:
                path = loras.find(self.folder, name)
            except ValueError as e:
                raise ModelError(str(e)) from None
            self._files[name] = LoraFile.read(path)
        return self._files[name]


class Applied:
    """The LoRA set a model's weights hold now, and the original weights it replaced."""

    def __init__(self):
        self.refs: tuple[tuple[LoraRef, str | None], ...] = ()
        self.originals: dict[torch.nn.Module, torch.Tensor] = {}

    def use(self, pipe, refs: Iterable[LoraRef], library: LoraLibrary,
            sources: Mapping[str, str] | None = None) -> None:
        """Make the pipeline's weights those of `refs` (restoring first if another set is on);
        `sources` maps the names of the job's own LoRAs to their store keys."""
        sources = sources or {}
        # Weight 0 is the model itself, exactly.
        wanted = tuple((r, sources.get(r.name)) for r in refs if r.te or r.unet)
        if wanted == self.refs:
            return
        self.restore()
        with torch.no_grad():
            for ref, source in wanted:
                self._apply(pipe, ref, library.get(ref.name, source))
        self.refs = wanted

    def _apply(self, pipe, ref: LoraRef, lora: LoraFile) -> None:
        modules = _layer_modules(pipe)
        matched = 0
        for (part, layer_name), layer in lora.layers.items():
            module = modules.get((part, layer_name))
            multiplier = ref.unet if part == "unet" else ref.te
            if module is None or "down" not in layer or "up" not in layer:
                continue
            matched += 1
            if multiplier == 0:
                continue
            if module not in self.originals:
                self.originals[module] = module.weight.detach().clone()
            module.weight += delta(layer, module.weight) * multiplier
        if not matched:
            raise ModelError(f"<lora:{ref.name}> matches no layer of this model (a LoRA for another family?)")

    def restore(self) -> None:
        with torch.no_grad():
            for module, weight in self.originals.items():
                module.weight.copy_(weight)
        self.originals.clear()
        self.refs = ()


def _layer_modules(pipe) -> dict[tuple[str, str], torch.nn.Module]:
    modules = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        component = getattr(pipe, part, None)
        if component is None:
            continue
        for name, module in component.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                modules[(part, name.removeprefix("text_model.").replace(".", "_"))] = module
    return modules
