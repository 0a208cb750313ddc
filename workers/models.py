"""The model cache: each model is loaded once per worker process and kept resident.

A model reference is a built-in name (`shapes-sd`, `tiny-sd`) or a local diffusers folder.
`shapes-sd` ships as a diffusers folder; the tiny ones are built into one first, so every model
loads through the same `from_pretrained` call.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from farm import checkpoints, metrics
from farm.errors import ModelError
from farm.spec import PICKLE_SUFFIXES
from workers import shapes, single_file, tiny
from workers.lora import Applied

log = logging.getLogger(__name__)

# Weight files whose hash names a diffusers folder, most telling first.
_HASHED_FILES = ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors")


#: diffusers pipeline class per mode; all share one set of weights through `from_pipe`.
PIPELINES = {
    "txt2img": "StableDiffusionPipeline",
    "img2img": "StableDiffusionImg2ImgPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
}
XL_PIPELINES = {
    "txt2img": "StableDiffusionXLPipeline",
    "img2img": "StableDiffusionXLImg2ImgPipeline",
    "inpaint": "StableDiffusionXLInpaintPipeline",
}


@dataclass
class LoadedModel:
    ref: str
    name: str
    hash: str
    path: Path
    pipe: object
    scheduler_config: dict
    #: The model's own VAE, kept apart: a chunk with a VAE override swaps `pipe.vae`.
    own_vae: object = None
    #: The LoRA set merged into the weights now (kept until a batch needs another).
    loras: Applied = field(default_factory=Applied)
    _pipes: dict = field(default_factory=dict)

    def pipeline(self, mode: str):
        """The pipeline for a mode, sharing this model's weights (no second copy in memory)."""
        if mode == "txt2img":
            return self.pipe
        if mode not in self._pipes:
            import diffusers

            # from_pipe casts every shared module to float32 unless told otherwise,
            # which would turn the model's own fp16 pipeline to fp32 too.
            classes = XL_PIPELINES if self.xl else PIPELINES
            pipe = getattr(diffusers, classes[mode]).from_pipe(self.pipe, dtype=self.pipe.unet.dtype)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[mode] = pipe
        return self._pipes[mode]

    @property
    def xl(self) -> bool:
        return "XL" in type(self.pipe).__name__

    @property
    def inpainting(self) -> bool:
        return self.pipe.unet.config.in_channels == 9


def model_hash(path: Path) -> str:
    """The webui's short hash: the first 10 hex digits of the sha256 of the weights file.
    A folder is named by its UNet's weights, the file that makes one fine-tune differ from another."""
    target = path
    if path.is_dir():
        target = next((path / f for f in _HASHED_FILES if (path / f).is_file()), None)
        if target is None:
            return ""
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def optimize_for_device(pipe, device: torch.device, compile_unet: bool = False) -> None:
    """On CUDA: channels-last UNet weights (faster convolutions in fp16), and torch.compile when
    asked. Attention is already PyTorch's SDPA, diffusers' default under torch 2."""
    if device.type != "cuda":
        return
    pipe.unet.to(memory_format=torch.channels_last)
    if compile_unet:
        pipe.unet = torch.compile(pipe.unet)


@dataclass
class LoadedVae:
    ref: str
    name: str
    hash: str
    module: object


def _is_xl_folder(path: Path) -> bool:
    import json

    try:
        return "XL" in json.loads((path / "model_index.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        return False


class ModelCache:
    def __init__(self, cache_dir: Path, device: torch.device, dtype: torch.dtype, capacity: int = 2,
                 config_override: Path | None = None, allow_pickle: bool = False, compile_unet: bool = False):
        self.cache_dir = cache_dir
        #: FARM_COMPILE: torch.compile each UNet (minutes of warm-up per shape, then faster).
        self.compile_unet = compile_unet
        #: FARM_ALLOW_PICKLE_CHECKPOINTS: the operator's opt-in to .ckpt/.pt files.
        self.allow_pickle = allow_pickle
        #: FARM_MODEL_CONFIGS: config folders for single-file checkpoints, replacing farm's own.
        self.config_override = config_override
        self.device = device
        self.dtype = dtype
        self.capacity = capacity
        self.loads = 0
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._vaes: dict[str, LoadedVae] = {}

    def get(self, ref: str) -> LoadedModel:
        if ref in self._models:
            self._models.move_to_end(ref)
            return self._models[ref]
        model = self._load(ref)
        self._models[ref] = model
        while len(self._models) > self.capacity:
            _, evicted = self._models.popitem(last=False)
            log.info("evicting model %s", evicted.name)
            metrics.MODEL_EVICTIONS.inc()
            del evicted
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return model

    def refs(self) -> list[str]:
        """The models held, least recently used first."""
        return list(self._models)

    def vae(self, ref: str) -> LoadedVae:
        """A VAE override (a diffusers AutoencoderKL folder), loaded once and kept."""
        if ref not in self._vaes:
            from diffusers import AutoencoderKL

            path = Path(ref)
            if path.suffix.lower() in PICKLE_SUFFIXES:
                raise ModelError(f"VAE {ref!r} is a pickle file; farm loads safetensors only")
            if not (path / "config.json").is_file():
                raise ModelError(f"VAE {ref!r} is not a diffusers AutoencoderKL folder (no config.json)")
            try:
                module = AutoencoderKL.from_pretrained(path, dtype=self.dtype, local_files_only=True,
                                                       use_safetensors=True).to(self.device)
            except (OSError, ValueError) as e:
                raise ModelError(f"VAE {ref!r} failed to load: {e}") from e
            weights = path / "diffusion_pytorch_model.safetensors"
            self._vaes[ref] = LoadedVae(ref, path.name, model_hash(weights) if weights.is_file() else "", module)
            self.loads += 1
        return self._vaes[ref]

    def _load_single_file(self, path: Path):
        if path.suffix.lower() in PICKLE_SUFFIXES:
            family = single_file.detect_pickled(path)
        elif path.suffix.lower() == ".safetensors":
            family = checkpoints.detect(path)
        else:
            raise ModelError(f"model {path.name}: a single-file checkpoint must be .safetensors")
        if not family.supported:
            raise ModelError(f"{path.name} is an {family.name} checkpoint; from single files farm loads "
                             f"{', '.join(checkpoints.SUPPORTED)} so far")
        config = single_file.config_folder(family, self.cache_dir, self.config_override)
        return single_file.load(path, family, config, self.dtype)

    def _resolve(self, ref: str) -> tuple[Path, str]:
        if ref == shapes.NAME:
            if not (shapes.MODEL_DIR / "model_index.json").is_file():
                raise ModelError(f"model {ref}: its weights are missing from {shapes.MODEL_DIR} (a broken install?)")
            return shapes.MODEL_DIR, ref
        if ref in tiny.TINY_MODELS:
            from safetensors import SafetensorError

            try:
                return tiny.builtin_model_dir(ref, self.cache_dir), ref
            except (OSError, SafetensorError) as e:  # a full disk shows up as either
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise ModelError(f"model {ref}: cannot build it in the model cache {self.cache_dir}: {reason}") from e
        path = Path(ref)
        if not path.exists():
            raise ModelError(f"model {ref!r} not found on this worker")
        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            raise ModelError(f"model {ref!r} is a pickle checkpoint; farm loads safetensors and diffusers folders "
                             "only, unless the operator sets FARM_ALLOW_PICKLE_CHECKPOINTS=1")
        if path.is_file():
            return path, path.stem
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model {ref!r} is not a diffusers folder (no model_index.json)")
        return path, path.name

    def _load(self, ref: str) -> LoadedModel:
        import diffusers

        path, name = self._resolve(ref)
        started = time.perf_counter()
        if path.is_file():
            pipe = self._load_single_file(path)
        else:
            xl = _is_xl_folder(path)
            cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
            no_checker = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
            try:
                pipe = cls.from_pretrained(path, dtype=self.dtype, local_files_only=True, use_safetensors=True,
                                           **no_checker)
            except (OSError, ValueError, EnvironmentError) as e:
                raise ModelError(f"model {ref!r} failed to load: {e}") from e
        pipe = pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        optimize_for_device(pipe, self.device, self.compile_unet)
        self.loads += 1
        metrics.MODEL_LOADS.inc()
        log.info("loaded model %s on %s in %.1fs", name, self.device, time.perf_counter() - started)
        return LoadedModel(ref, name, model_hash(path), path, pipe, dict(pipe.scheduler.config), own_vae=pipe.vae)
