"""The webui's PNG `parameters` text: written exactly as the webui writes it, and read back.

Format (AUTOMATIC1111 v1.10.1, `processing.create_infotext`)::

    <prompt>
    Negative prompt: <negative prompt>          (only when not empty)
    Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, ...
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from farm.prompts import uses_emphasis
from farm.spec import ResizeMode

if TYPE_CHECKING:
    from farm.plan import Item

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
    text = format_value(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def format_value(value: Any) -> str:
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


# --- the farm's parameters, both ways ------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One infotext key: how an item writes it, and which spec field it reads back into."""

    key: str
    #: The value for an item, or None to leave the key out (as the webui leaves out defaults).
    write: Callable[["Item"], Any]
    #: The spec field `farm submit --from-image` sets from it, and how; None: not read back.
    field: str | None = None
    read: Callable[[str], Any] = str


def _inpaint(item: "Item") -> bool:
    return item.mode == "inpaint"


def _notes_emphasis(item: "Item") -> bool:
    # The webui writes the mode only when it is not its default and a prompt has brackets.
    return item.emphasis != "Original" and (uses_emphasis(item.prompt) or uses_emphasis(item.negative_prompt))


def _only_masked(item: "Item") -> bool:
    return item.inpaint_area == "only masked"


#: Every key the farm writes from an item, in the webui's order (keys after the model's are
#: written after it; infotext.build orders the rest).
PARAMS = (
    Param("Steps", lambda i: i.steps, "steps", int),
    Param("Sampler", lambda i: i.sampler, "sampler"),
    Param("Schedule type", lambda i: i.schedule_type, "schedule_type"),
    Param("CFG scale", lambda i: i.cfg_scale, "cfg_scale", float),
    Param("Seed", lambda i: i.seed),
    Param("Size", lambda i: f"{i.width}x{i.height}"),
    Param("Variation seed", lambda i: i.variation_seed if i.variation_strength else None, "variation_seed", int),
    Param("Variation seed strength", lambda i: i.variation_strength or None, "variation_strength", float),
    Param("Seed resize from", lambda i: "{}x{}".format(*i.resize_seed_from) if i.resize_seed_from else None),
    Param("Denoising strength", lambda i: i.hires.denoising_strength if i.hires else i.denoising_strength),
    Param("Clip skip", lambda i: i.clip_skip if i.clip_skip > 1 else None, "clip_skip", int),
    Param("Hires upscale", lambda i: i.hires.scale if i.hires else None),
    Param("Hires steps", lambda i: i.hires.steps or None if i.hires else None),
    Param("Hires upscaler", lambda i: i.hires.upscaler if i.hires else None),
    Param("Mask blur", lambda i: i.mask_blur if _inpaint(i) else None),
    Param("Masked content", lambda i: i.masked_content),
    Param("Inpaint area", lambda i: "Only masked" if _only_masked(i) else None),
    Param("Masked area padding", lambda i: i.padding if _only_masked(i) else None),
    Param("Mask mode", lambda i: "Inpaint not masked" if i.invert_mask else None),
    Param("Resize mode", lambda i: ResizeMode(i.resize_mode).label if i.mode != "txt2img" and i.resize_mode else None),
    Param("Fix steps", lambda i: "True" if i.fix_steps else None),
    Param("Emphasis", lambda i: i.emphasis if _notes_emphasis(i) else None, "emphasis"),
)

#: infotext key -> (spec field, converter), for the keys that read straight back into a spec.
READ_BACK = {p.key: (p.field, p.read) for p in PARAMS if p.field}


def for_item(item: "Item", *, model_name: str, model_hash: str, vae_name: str | None = None,
             vae_hash: str | None = None, version: str, extra: Mapping[str, Any] | None = None) -> str:
    """The `parameters` text of an image the farm drew for `item`; `extra` holds what only the
    drawing knew (`TI hashes`), written where the webui writes it, before `Emphasis`."""
    params = {p.key: p.write(item) for p in PARAMS}
    emphasis = params.pop("Emphasis")
    params.update(extra or {})
    params["Emphasis"] = emphasis
    params.update({"Model hash": model_hash or None, "Model": model_name, "VAE hash": vae_hash or None,
                   "VAE": vae_name})
    return build(item.prompt, item.negative_prompt, params, version=version)
