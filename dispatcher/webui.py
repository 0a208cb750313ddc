"""The AUTOMATIC1111 webui's API (`/sdapi/v1`, v1.10.1) over the pool: a request to txt2img or
img2img becomes one farm job in the interactive lane, its `n_iter` x `batch_size` images spread
over the workers, and the answer is the webui's own `{images, parameters, info}`.

The webui's seeds are kept: image i gets `seed + i` (or, with a variation strength, the same
seed and `subseed + i`), its batches are the webui's batches, and the farm's images carry the
infotext the webui's PNG Info reads. A field the farm does not implement is refused with 422
naming it, unless it holds the webui's own default (clients send every field).
"""

from __future__ import annotations

import base64
import json
import random
import time
from typing import Any

from farm import infotext, png
from farm.errors import SpecError
from farm.samplers import ScheduleType
from farm.spec import MAX_SEED

#: The webui's defaults for the fields the farm implements (modules/api/models.py and
#: modules/processing.py, v1.10.1).
DEFAULTS: dict[str, Any] = {
    "prompt": "", "negative_prompt": "", "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "sampler_index": "Euler",
    "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "denoising_strength": None, "override_settings": {}, "send_images": True, "save_images": False,
    "enable_hr": False, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "init_images": None, "mask": None, "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "resize_mode": 0,
}
#: Fields the webui has and the farm does not run, accepted only with these (default) values.
UNUSED: dict[str, tuple] = {
    "styles": (None, []), "restore_faces": (None, False), "tiling": (None, False),
    "do_not_save_samples": (False,), "do_not_save_grid": (False,), "s_min_uncond": (None, 0, 0.0),
    # s_tmax 0 is the webui's "no limit", as None is (processing.py: `s_tmax or float('inf')`).
    "s_churn": (None, 0, 0.0), "s_tmax": (None, 0, 0.0), "s_tmin": (None, 0, 0.0), "s_noise": (None, 1, 1.0),
    "override_settings_restore_afterwards": (True,), "refiner_checkpoint": (None, ""), "refiner_switch_at": (None,),
    "disable_extra_networks": (False,), "comments": (None, {}), "firstphase_width": (0,), "firstphase_height": (0,),
    "hr_resize_x": (0,), "hr_resize_y": (0,), "hr_checkpoint_name": (None, ""), "hr_sampler_name": (None, ""),
    "hr_scheduler": (None, ""), "hr_prompt": ("",), "hr_negative_prompt": ("",), "force_task_id": (None,),
    "script_name": (None, ""), "script_args": ([],), "alwayson_scripts": ({},), "infotext": (None, ""),
    "include_init_images": (False,), "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None,), "mask_round": (True,), "inpainting_mask_weight": (None,), "mask_blur_x": (4,),
    "mask_blur_y": (4,),
}
#: Fields the webui itself ignores for every model the farm runs, taken with any value:
#: image_cfg_scale is read only by instruct-pix2pix models.
IGNORED = {"image_cfg_scale"}
#: The webui's eta when a request leaves it out: eta_ddim for DDIM, eta_ancestral for the
#: ancestral samplers (the others never read it). Only that value is taken.
DEFAULT_ETA = {"DDIM": 0.0}
ANCESTRAL_ETA = 1.0
#: override_settings keys the farm honours, and the spec field each sets.
OVERRIDES = {"sd_model_checkpoint": "model", "CLIP_stop_at_last_layers": "clip_skip", "emphasis": "emphasis"}
SCHEDULE_LABELS = {s.value.lower(): s.value for s in ScheduleType}
#: The webui's inpainting_fill, by index.
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
#: Spec fields named as the webui names them, for error messages.
WEBUI_NAME = {"prompts": "prompt", "sampler": "sampler_name", "schedule_type": "scheduler", "model":
              "override_settings.sd_model_checkpoint", "clip_skip": "override_settings.CLIP_stop_at_last_layers",
              "emphasis": "override_settings.emphasis",
              "hires.scale": "hr_scale", "hires.upscaler": "hr_upscaler", "hires.steps": "hr_second_pass_steps",
              "hires.denoising_strength": "denoising_strength", "variation_seed": "subseed",
              "variation_strength": "subseed_strength", "init_image": "init_images", "masked_content":
              "inpainting_fill", "padding": "inpaint_full_res_padding", "invert_mask": "inpainting_mask_invert",
              "resize_seed_from": "seed_resize_from_w", "seeds.start": "seed", "seeds": "seed"}


def request_fields(body: Any, mode: str) -> dict[str, Any]:
    """The request with the webui's defaults filled in; SpecError names every field the farm
    does not take (unknown, or not at its default)."""
    if not isinstance(body, dict):
        raise SpecError.single("body", "must be a JSON object")
    problems = []
    for name, value in body.items():
        if name in DEFAULTS or name in IGNORED:
            continue
        if name == "eta":
            problems.extend(_eta_problems(value, body.get("sampler_name") or body.get("sampler_index")))
            continue
        if name in UNUSED:
            if value not in UNUSED[name]:
                problems.append((name, f"the farm does not implement {name}; leave it at {UNUSED[name][0]!r}"))
        else:
            problems.append((name, "unknown field"))
    if mode == "txt2img" and body.get("init_images"):
        problems.append(("init_images", "belongs to img2img"))
    for key in (body.get("override_settings") or {}):
        if key not in OVERRIDES:
            problems.append((f"override_settings.{key}", f"the farm honours only {', '.join(OVERRIDES)}"))
    if problems:
        raise SpecError(problems)
    fields = {**DEFAULTS, **body}
    if mode == "img2img" and fields["denoising_strength"] is None:
        fields["denoising_strength"] = 0.75
    return fields


def _eta_problems(eta: Any, sampler: Any) -> list[tuple[str, str]]:
    default = DEFAULT_ETA.get(str(sampler), ANCESTRAL_ETA)
    if eta is None or (isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta == default):
        return []
    return [("eta", f"the farm runs {sampler or 'this sampler'} with the webui's default eta only; "
                    f"leave it at {default} or null")]


def _seed(value: Any, field: str) -> int:
    if value in (None, "", -1):
        return random.randrange(MAX_SEED)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError.single(field, f"must be an integer, got {value!r}")
    return value


def job_spec(fields: dict[str, Any], mode: str, *, model: str) -> dict[str, Any]:
    """The farm job for a webui request (already through request_fields): a dict for parse_spec."""
    count = _positive(fields, "batch_size") * _positive(fields, "n_iter")
    seed, subseed = _seed(fields["seed"], "seed"), _seed(fields["subseed"], "subseed")
    overrides = fields.get("override_settings") or {}
    spec: dict[str, Any] = {
        "lane": "interactive", "prompts": [fields["prompt"]], "negative_prompt": fields["negative_prompt"],
        "model": overrides.get("sd_model_checkpoint") or model, "steps": fields["steps"],
        "cfg_scale": fields["cfg_scale"], "width": fields["width"], "height": fields["height"],
        "sampler": fields["sampler_name"] or fields["sampler_index"], "batch_size": fields["batch_size"],
    }
    if fields["scheduler"]:
        # The webui takes a schedule's label ("Karras") or its name ("karras").
        spec["schedule_type"] = SCHEDULE_LABELS.get(str(fields["scheduler"]).lower(), fields["scheduler"])
    if "CLIP_stop_at_last_layers" in overrides:
        spec["clip_skip"] = overrides["CLIP_stop_at_last_layers"]
    if "emphasis" in overrides:
        spec["emphasis"] = overrides["emphasis"]
    if fields["subseed_strength"]:
        # The webui keeps the seed and walks the variation seed instead.
        spec.update(seeds=[seed], variation_strength=fields["subseed_strength"],
                    grid={"variation_seed": [subseed + i for i in range(count)]})
    else:
        spec["seeds"] = {"start": seed, "count": count}
    if fields["seed_resize_from_w"] > 0 and fields["seed_resize_from_h"] > 0:
        spec["resize_seed_from"] = [fields["seed_resize_from_w"], fields["seed_resize_from_h"]]
    if mode == "txt2img" and fields["enable_hr"]:
        spec["hires"] = {"scale": fields["hr_scale"], "upscaler": fields["hr_upscaler"] or "Latent",
                         "steps": fields["hr_second_pass_steps"],
                         "denoising_strength": 0.7 if fields["denoising_strength"] is None
                         else fields["denoising_strength"]}
    if mode == "img2img":
        spec.update(_image_fields(fields))
    return spec


def _positive(fields: dict, name: str) -> int:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecError.single(name, f"must be a whole number of at least 1, got {value!r}")
    return value


def _image_fields(fields: dict) -> dict[str, Any]:
    images = fields["init_images"]
    if not isinstance(images, list) or len(images) != 1:
        raise SpecError.single("init_images", "the farm takes exactly one init image per request")
    spec: dict[str, Any] = {"mode": "img2img", "init_image": images[0],
                            "denoising_strength": fields["denoising_strength"],
                            "resize_mode": fields["resize_mode"]}
    if fields["mask"]:
        fill = fields["inpainting_fill"]
        if fill not in range(len(MASKED_CONTENT)):
            raise SpecError.single("inpainting_fill", f"must be 0-3 (fill, original, latent noise, latent nothing), "
                                                      f"got {fill!r}")
        spec.update(mode="inpaint", mask=fields["mask"], mask_blur=fields["mask_blur"],
                    masked_content=MASKED_CONTENT[fill],
                    inpaint_area="only masked" if fields["inpaint_full_res"] else "whole",
                    padding=fields["inpaint_full_res_padding"], invert_mask=bool(fields["inpainting_mask_invert"]))
    return spec


def webui_problems(e: SpecError) -> SpecError:
    """The same problems, named by the webui's fields instead of the farm spec's."""
    renamed = []
    for field, reason in e.problems:
        base = field.split("[")[0]
        renamed.append((WEBUI_NAME.get(field) or WEBUI_NAME.get(base) or field, reason))
    return SpecError(renamed)


def answer(fields: dict[str, Any], pictures: list[bytes], *, job_id: str) -> dict[str, Any]:
    """The webui's response: base64 PNGs (with their infotext), the request, and `info`, the JSON
    string `Processed.js()` writes."""
    texts = [png.read_parameters(p) or "" for p in pictures]
    parsed = [infotext.parse(t) for t in texts]
    first = parsed[0] if parsed else {}
    seeds = [int(p.get("Seed", 0)) for p in parsed]
    subseeds = [int(p.get("Variation seed", 0)) for p in parsed] if fields["subseed_strength"] else \
        [(_as_int(fields["subseed"]) or 0) + i for i in range(len(parsed))]
    info = {
        "prompt": fields["prompt"], "all_prompts": [p.get("Prompt", fields["prompt"]) for p in parsed],
        "negative_prompt": fields["negative_prompt"],
        "all_negative_prompts": [p.get("Negative prompt", fields["negative_prompt"]) for p in parsed],
        "seed": seeds[0] if seeds else fields["seed"], "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else fields["subseed"], "all_subseeds": subseeds,
        "subseed_strength": fields["subseed_strength"], "width": fields["width"], "height": fields["height"],
        "sampler_name": first.get("Sampler", fields["sampler_name"]), "cfg_scale": fields["cfg_scale"],
        "steps": fields["steps"], "batch_size": fields["batch_size"], "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": first.get("Model"), "sd_model_hash": first.get("Model hash"),
        "sd_vae_name": first.get("VAE"), "sd_vae_hash": first.get("VAE hash"),
        "seed_resize_from_w": fields["seed_resize_from_w"], "seed_resize_from_h": fields["seed_resize_from_h"],
        "denoising_strength": fields["denoising_strength"], "extra_generation_params": {},
        "index_of_first_image": 0, "infotexts": texts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": int(first.get("Clip skip", 1)),
        "is_using_inpainting_conditioning": False, "version": first.get("Version"), "farm_job": job_id,
    }
    images = [base64.b64encode(p).decode() for p in pictures] if fields["send_images"] else []
    return {"images": images, "parameters": fields, "info": json.dumps(info)}


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

