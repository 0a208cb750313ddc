"""Malformed API bodies made from a valid one, each wrong in one place: a type swapped, a value
out of range, a required field dropped or nulled, an unknown key added, a list emptied, a grid
value spoiled. Each comes with the field its answer must name."""

from __future__ import annotations

import copy
from typing import Any, Iterator

#: A valid job that touches most of the spec: a sweep with hires fix and a webhook.
BASE: dict[str, Any] = {
    "name": "sweep", "lane": "batch", "priority": 10, "model": "shapes-sd",
    "prompts": ["a red circle", "a blue square"], "negative_prompt": "blurry",
    "seeds": {"start": 1, "count": 2}, "steps": 4, "cfg_scale": 7.0, "sampler": "DPM++ 2M",
    "schedule_type": "Karras", "width": 64, "height": 64, "batch_size": 2, "clip_skip": 1,
    "variation_seed": 3, "variation_strength": 0.2,
    "hires": {"scale": 1.5, "upscaler": "Latent", "steps": 2, "denoising_strength": 0.5},
    "grid": {"cfg_scale": [4.0, 7.0], "steps": [2, 4]},
    "webhook": "https://example.com/hook", "webhook_each": False,
}
#: Fields that may be null (null means "not set").
NULLABLE = {"name", "variation_seed", "hires", "webhook"}
#: Words that are no value of the field they replace.
NOT_A_CHOICE = {"lane": "overnight", "model": "no-such-model", "sampler": "Euler z", "schedule_type": "Sometimes",
                "hires.upscaler": "ESRGAN_4x", "webhook": "ftp://example.com/hook", "name": "../escape"}


def _wrong_type(value: Any) -> Any:
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float)):
        return "seven"
    if isinstance(value, str):
        return 12345
    if isinstance(value, list):
        return {"not": "a list"}
    return ["not", "an", "object"]


def _leaves(body: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in body.items():
        path = prefix + name
        yield path, value
        if isinstance(value, dict) and name != "grid":
            yield from _leaves(value, path + ".")


def _set(body: dict, path: str, value: Any) -> dict:
    changed = copy.deepcopy(body)
    *parents, last = path.split(".")
    target = changed
    for part in parents:
        target = target[part]
    if value is _DROP:
        del target[last]
    else:
        target[last] = value
    return changed


_DROP = object()


def mutations(base: dict = BASE) -> Iterator[tuple[str, str, dict]]:
    """(what was done, the field the answer must name, the body)."""
    for path, value in _leaves(base):
        yield f"{path}: wrong type", path, _set(base, path, _wrong_type(value))
        if path not in NULLABLE:
            yield f"{path}: null", path, _set(base, path, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            for bad in (-10**10, 10**10):
                yield f"{path}: {bad}", path, _set(base, path, bad)
        if path in NOT_A_CHOICE:
            yield f"{path}: not a choice", path, _set(base, path, NOT_A_CHOICE[path])
        if isinstance(value, list):
            yield f"{path}: empty", path, _set(base, path, [])
    for path in ("", "seeds.", "hires."):
        yield f"{path}colour: unknown key", path + "colour", _set(base, path + "colour", "red")
    yield "prompts: dropped", "prompts", _set(base, "prompts", _DROP)
    yield "prompts.1: too long", "prompts.1", _set(base, "prompts", ["ok", "x" * 10_001])
    yield "prompts.0: not text", "prompts.0", _set(base, "prompts", [7, "ok"])
    yield "negative_prompt: too long", "negative_prompt", _set(base, "negative_prompt", "x" * 10_001)
    yield "seeds: a seed below -1", "seeds.1", _set(base, "seeds", [1, -5])
    yield "seeds: text in the list", "seeds.0", _set(base, "seeds", ["one"])
    yield "seeds.count: dropped", "seeds.count", _set(base, "seeds.count", _DROP)
    yield "width: not a multiple of 8", "width", _set(base, "width", 100)
    yield "height: fractional", "height", _set(base, "height", 64.5)
    yield "steps: text", "steps", _set(base, "steps", "20")
    yield "steps: true", "steps", _set(base, "steps", True)
    yield "grid.colour: unknown axis", "grid.colour", _set(base, "grid.colour", ["red"])
    yield "grid.seed: unknown axis", "grid.seed", _set(base, "grid.seed", [1, 2])
    yield "grid.steps: a bad value", "grid.steps[1]", _set(base, "grid.steps", [2, 0])
    yield "grid.cfg_scale: text", "grid.cfg_scale[0]", _set(base, "grid.cfg_scale", ["high"])
    yield "grid.sampler: unknown sampler", "grid.sampler[1]", _set(base, "grid.sampler", ["Euler", "Euler z"])
    yield "grid.width: not a multiple of 8", "grid.width[0]", _set(base, "grid.width", [65])
    yield "grid.steps: not a list", "grid.steps", _set(base, "grid.steps", 4)
    yield "mode: img2img without an image", "init_image", _set(base, "mode", "img2img")
    yield "mode: unknown", "mode", _set(base, "mode", "outpaint")
    yield "mask: without inpaint", "mask", _set(base, "mask", "store:m.png")
    yield "init_image: not base64", "init_image", {**_set(base, "mode", "img2img"), "init_image": "%%%"}
    yield "resize_seed_from: one side", "resize_seed_from", _set(base, "resize_seed_from", [64])
    yield "variation_strength: 2", "variation_strength", _set(base, "variation_strength", 2)
    yield "prompts_file: a file on the server", "prompts_file", _set(base, "prompts_file", "/etc/passwd")
    yield "vae: a path outside the model folder", "vae", _set(base, "vae", "../vae.safetensors")
    yield "loras: a pickle", "loras.x", _set(base, "loras", {"x": "store:x.ckpt"})
    yield "loras: not a table", "loras", _set(base, "loras", ["store:x.safetensors"])
