"""The webui's PNG `parameters` text: written exactly as the webui writes it, and read back.

Format (AUTOMATIC1111 v1.10.1, `processing.create_infotext`)::

    <prompt>
    Negative prompt: <negative prompt>          (only when not empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, ...
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping

#: The webui's key order; keys not listed here follow in the order given, before Version.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
    "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
    "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD", "RNG",
    "Hires upscale", "Hires steps", "Hires upscaler", "Mask blur", "Masked content", "Inpaint area",
    "Masked area padding",
)

# The webui reader's pattern for one `key: value` pair (infotext_utils.re_param_code).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


def quote(value: Any) -> str:
    text = _format(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _format(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def build(prompt: str, negative_prompt: str, params: Mapping[str, Any], version: str) -> str:
    """The `parameters` text for one image. None values are left out, as the webui does."""
    ordered = {k: params[k] for k in KEY_ORDER if params.get(k) is not None}
    ordered.update({k: v for k, v in params.items() if k not in ordered and v is not None and k != "Version"})
    ordered["Version"] = version
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in ordered.items())
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}"


def parse(text: str) -> dict[str, Any]:
    """Parse `parameters` text as the webui's PNG Info does (parse_generation_parameters)."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    result: dict[str, Any] = {"Prompt": prompt, "Negative prompt": negative}
    for key, value in _PAIR.findall(last):
        key = key.strip()
        try:
            if value and value[0] == '"' and value[-1] == '"':
                value = json.loads(value)
        except json.JSONDecodeError:
            pass
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result
