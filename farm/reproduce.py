"""A job spec from an image's infotext, so any image the pool made can be made again."""

from __future__ import annotations

from typing import Any

from farm import infotext, png
from farm.errors import SpecError
from farm.spec import BUILTIN_MODELS


def spec_from_image(data: bytes, model: str | None = None) -> dict[str, Any]:
    """A txt2img spec (as a dict, to be validated) that reproduces the image."""
    text = png.read_parameters(data)
    if text is None:
        raise SpecError.single("image", "has no 'parameters' text")
    params = infotext.parse(text)
    if "Mask blur" in params or "Denoising strength" in params:
        raise SpecError.single("image", "was made by img2img or inpaint; reproducing it needs its init image, "
                                        "so write a spec with init_image")
    try:
        spec: dict[str, Any] = {
            "prompts": [params["Prompt"]],
            "negative_prompt": params.get("Negative prompt", ""),
            "seeds": [int(params["Seed"])],
            "width": int(params["Size-1"]),
            "height": int(params["Size-2"]),
            "batch_size": 1,
        }
        for key, (field, convert) in infotext.READ_BACK.items():
            if key in params:
                spec[field] = convert(params[key])
        if "Seed resize from-1" in params:
            spec["resize_seed_from"] = [int(params["Seed resize from-1"]), int(params["Seed resize from-2"])]
    except (KeyError, ValueError) as e:
        raise SpecError.single("image", f"its parameters cannot be read back: {e!r}") from None
    named = params.get("Model")
    if model is None and named not in BUILTIN_MODELS:
        raise SpecError.single("model", f"the image names model {named!r}, which is not built in; pass --model PATH")
    spec["model"] = model or named
    return spec
