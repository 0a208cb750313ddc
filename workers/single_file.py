"""Load a single-file .safetensors checkpoint (original LDM key layout), offline.

`from_single_file` converts the weights to diffusers' layout, but it needs each
component's config and the tokenizer files, which it would fetch from the hub.
farm carries a config-only folder per family (workers/model_configs) and builds the
real CLIP tokenizer files from the BPE vocabulary shipped beside them.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from pathlib import Path

from farm.checkpoints import Family, family_from_shapes
from farm.errors import ModelError
from workers.tiny import bytes_to_unicode

PACKAGED_CONFIGS = Path(__file__).parent / "model_configs"
BPE_VOCAB = PACKAGED_CONFIGS / "bpe_simple_vocab_16e6.txt.gz"
#: CLIP's vocabulary: 256 bytes, the same with </w>, these merges, and two specials (49408 in all).
CLIP_MERGES = 49152 - 256 - 2


def clip_tokenizer_files(target: Path, pad_token: str = "<|endoftext|>") -> None:
    """vocab.json and merges.txt of the CLIP tokenizer, as CLIP builds them from its BPE file.
    OpenCLIP (SD2's text encoder) pads with "!" (id 0) where OpenAI's CLIP pads with its end token."""
    lines = gzip.open(BPE_VOCAB, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1:CLIP_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    (target / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token,
    }))


def config_folder(family: Family, cache_dir: Path, override: Path | None = None) -> Path:
    """The config-only folder for a family: the operator's, or the packaged one plus a tokenizer."""
    if override is not None:
        folder = override / family.name
        if not (folder / "model_index.json").is_file():
            raise ModelError(f"no config folder for {family.name} in FARM_MODEL_CONFIGS ({override})")
        return folder
    source = PACKAGED_CONFIGS / family.name
    if not source.is_dir():
        raise ModelError(f"farm carries no config for {family.name} checkpoints")
    target = cache_dir / "configs" / family.name
    if (target / "tokenizer" / "vocab.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family.name}-", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        clip_tokenizer_files(staging / "tokenizer", pad_token="!" if family.base == "sd2" else "<|endoftext|>")
        if family.base == "sdxl":
            clip_tokenizer_files(staging / "tokenizer_2", pad_token="!")  # its OpenCLIP-bigG encoder
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def detect_pickled(path: Path) -> Family:
    """The family of a .ckpt/.pt checkpoint the operator allowed. torch's restricted unpickler
    (weights_only) rebuilds tensors and plain containers only, as the webui's allow-list does;
    diffusers loads the file the same way."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        raise ModelError(f"{path.name} was refused by the restricted unpickler: {e}") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} holds no state dict")
    return family_from_shapes({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")}, path.name)


def load(path: Path, family: Family, config: Path, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = family.base == "sdxl"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    no_checker = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=dtype,
                                    **no_checker)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"{path.name} ({family.name}) failed to load: {e}") from e
    if family.base == "sd2":
        prediction = "v_prediction" if predicts_velocity(pipe.unet) else "epsilon"
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction)
    return pipe


def predicts_velocity(unet) -> bool:
    """The webui's test (`is_using_v_parameterization_for_sd2`): SD2 768-v and 512-base share one
    key layout, and only the UNet's answer to a fixed input tells them apart."""
    import torch

    dtype = unet.dtype
    x = torch.full((1, 4, 8, 8), 0.5, device=unet.device, dtype=dtype)
    context = torch.full((1, 77, unet.config.cross_attention_dim), 0.5, device=unet.device, dtype=dtype)
    if unet.config.in_channels == 9:
        x = torch.cat([x, torch.zeros((1, 5, 8, 8), device=unet.device, dtype=dtype)], dim=1)
    with torch.inference_mode():
        out = unet(x, torch.tensor([999], device=unet.device), encoder_hidden_states=context).sample
    return bool((out.float() - x[:, :4].float()).mean() < -1)
