"""The job spec: parsed and validated once, where it enters, into an immutable object.

A spec is TOML or JSON. Every problem is reported with the field it concerns and
the reason (`steps: must be 1-150, got 0`); unknown keys are errors. Code behind
this edge trusts a JobSpec.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import tomllib
from enum import IntEnum
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args
from urllib.parse import urlparse

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from pydantic_core import core_schema

from farm import checkpoints, prompts, samplers
from farm.errors import ModelError, SpecError
from farm.prompts import Emphasis

#: shapes-sd draws what it is asked for (in a world of coloured shapes); the tiny ones draw noise, fast.
SHAPES_SD, TINY_SD, TINY_SD_INPAINT = "shapes-sd", "tiny-sd", "tiny-sd-inpaint"
BUILTIN_MODELS = (SHAPES_SD, TINY_SD, TINY_SD_INPAINT)
INPAINTING_BUILTINS = (TINY_SD_INPAINT,)
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_PROMPT_CHARS = 10_000
MAX_ITEMS = 10_000_000
#: Largest seed the webui draws; -1 asks for a random one.
MAX_SEED = 4294967294
MAX_IMAGE_SIDE = 4096
MAX_IMAGE_BYTES = 50 * 1024 * 1024
#: An init image or mask given as a key in the job's store rather than a local path.
STORE_PREFIX = "store:"
#: The webui's "Prompt S/R" axis: its first value is searched in each prompt (and negative
#: prompt) and replaced by each value in turn.
PROMPT_SR = "prompt_sr"
#: Axes a [grid] may sweep. Seeds, prompts and a list of init images are axes of their own.
GRID_AXES = ("model", "vae", "prompt_sr", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule_type", "width", "height",
             "denoising_strength", "mask_blur", "masked_content", "clip_skip", "emphasis", "variation_seed",
             "variation_strength")


class ResizeMode(IntEnum):
    """The webui's resize modes, by index: a spec gives the index or the name."""

    JUST_RESIZE = 0
    CROP_AND_RESIZE = 1
    RESIZE_AND_FILL = 2
    LATENT_UPSCALE = 3

    @property
    def spec_name(self) -> str:
        """"just resize", "crop and resize", "resize and fill", "latent upscale"."""
        return self.name.lower().replace("_", " ")

    @property
    def label(self) -> str:
        """The webui's name for it, as its infotext writes it."""
        return "Just resize (latent upscale)" if self is ResizeMode.LATENT_UPSCALE else self.spec_name.capitalize()


#: Fields that mean something only with an init image, and those only for inpaint.
_IMAGE_FIELDS = ("init_image", "denoising_strength", "fix_steps", "resize_mode")
_INPAINT_FIELDS = ("mask", "mask_blur", "masked_content", "inpaint_area", "padding", "invert_mask")
_TXT2IMG_ONLY = ("hires",)


class _Range:
    """A value within lo..hi, refused with the spec's own wording; published in the JSON schema
    as minimum and maximum."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi

    def _check(self, value):
        if not self.lo <= value <= self.hi:
            raise ValueError(f"must be {self.lo}-{self.hi}, got {value!r}")
        return value

    def __get_pydantic_core_schema__(self, source, handler):
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(self, schema, handler):
        return {**handler(schema), "minimum": self.lo, "maximum": self.hi}


def _not_empty(what: str):
    def check(values: list) -> list:
        if not values:
            raise ValueError(f"must list at least one {what}")
        return values

    return check


def _multiple_of_8(value: int) -> int:
    if value % 8:
        raise ValueError(f"must be a multiple of 8, got {value}")
    return value


def _seed(value: int) -> int:
    if value != -1 and not 0 <= value <= MAX_SEED:
        raise ValueError(f"must be -1 (random) or 0-{MAX_SEED}, got {value}")
    return value


def _prompt(value: str) -> str:
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if (why := prompts.problem(value)) is not None:
        raise ValueError(why)
    return value


def _negative_prompt(value: str) -> str:
    if (why := prompts.problem(value, negative=True)) is not None:
        raise ValueError(why)
    return value


def _sampler_name(value: str) -> str:
    try:
        samplers.resolve(value)
    except samplers.SamplerChoiceError as e:
        # A schedule other than Automatic is checked with its sampler, below.
        if samplers.split_combined(value)[0] not in samplers.SAMPLERS:
            raise ValueError(str(e)) from None
    return value


def _schedule_name(value: str) -> str:
    if value not in {s.value for s in samplers.ScheduleType}:
        raise ValueError(
            f"unknown schedule type {value!r}; accepted: {', '.join(s.value for s in samplers.ScheduleType)}"
        )
    return value


def _model(value: str, info: ValidationInfo) -> str:
    if not value:
        raise ValueError("must name a built-in model or a local model folder/file")
    if value.lower().endswith(PICKLE_SUFFIXES) and not (info.context or {}).get("allow_pickle"):
        raise ValueError(
            f"{Path(value).name} is a pickle checkpoint, which can run code when loaded; farm loads "
            ".safetensors files and diffusers folders (an operator may set FARM_ALLOW_PICKLE_CHECKPOINTS=1)"
        )
    return value


#: Checkpoint formats that are Python pickles; refused before a byte of them is read.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def _resize_mode(value: int | str) -> int:
    names = {mode.spec_name: int(mode) for mode in ResizeMode}
    if isinstance(value, int) and not isinstance(value, bool) and value in ResizeMode._value2member_map_:
        return value
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    raise ValueError(f"must be 0-3 or one of {', '.join(names)}, got {value!r}")


def _nonempty_text(value: str, what: str) -> str:
    if not value.strip():
        raise ValueError(f"must be {what}, got an empty string")
    return value


def _webhook_url(value: str) -> str:
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or len(value) > 2000:
        raise ValueError(f"must be an http:// or https:// URL of at most 2000 characters, got {value[:80]!r}")
    return value


def _lora_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9 ._-]{0,127}", value):
        raise ValueError(f"a LoRA's name is 1-128 letters, digits, spaces, '.', '_' or '-', got {value[:80]!r}")
    return value


def _lora_file(value: str) -> str:
    if value.lower().endswith(PICKLE_SUFFIXES):
        raise ValueError(f"{Path(value).name} is a pickle-format LoRA, which farm never loads; convert it to "
                         ".safetensors")
    if not value.lower().endswith(".safetensors"):
        raise ValueError(f"must be a .safetensors file (a path or a store: key), got {value[:80]!r}")
    return value


def _job_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {value[:80]!r}"
        )
    return value


Steps = Annotated[int, _Range(1, 150)]
Strength = Annotated[float, _Range(0, 1)]
MaskBlur = Annotated[int, _Range(0, 64)]
ClipSkip = Annotated[int, _Range(1, 12)]
ResizeModeValue = Annotated[Union[int, str], AfterValidator(_resize_mode)]
MaskedContent = Literal["fill", "original", "latent noise", "latent nothing"]
ImageRef = Annotated[str, AfterValidator(lambda v: _nonempty_text(v, "a path or a store: key"))]
CfgScale = Annotated[float, _Range(1, 30)]
Side = Annotated[int, _Range(64, 2048), AfterValidator(_multiple_of_8), Field(json_schema_extra={"multipleOf": 8})]
Seed = Annotated[int, AfterValidator(_seed)]
Prompt = Annotated[str, AfterValidator(_prompt)]
NegativePrompt = Annotated[Prompt, AfterValidator(_negative_prompt)]
SamplerName = Annotated[str, AfterValidator(_sampler_name)]
ScheduleName = Annotated[str, AfterValidator(_schedule_name)]
ModelRef = Annotated[str, AfterValidator(_model)]
LoraName = Annotated[str, AfterValidator(_lora_name)]
LoraRef = Annotated[str, AfterValidator(_lora_file)]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class SeedRange(BaseModel):
    model_config = _STRICT
    start: Seed
    count: Annotated[int, _Range(1, MAX_ITEMS)]


#: The webui's hires upscalers that farm runs: latent-space interpolation, or pixels resized.
HiresUpscaler = Literal["Latent", "Latent (nearest)", "Lanczos", "Nearest"]


class Hires(BaseModel):
    """The webui's "Hires. fix": render, upscale, then a second img2img pass at the larger size."""

    model_config = _STRICT
    scale: Annotated[float, _Range(1, 4)] = 2.0
    upscaler: HiresUpscaler = "Latent"
    #: Steps of the second pass; 0 means as many as the first.
    steps: Annotated[int, _Range(0, 150)] = 0
    denoising_strength: Annotated[float, _Range(0, 1)] = 0.7

    def size(self, width: int, height: int) -> tuple[int, int]:
        return hires_size(width, height, self.scale)


def _shard_bytes(value: str) -> str:
    from farm.export import parse_size  # farm.export reads specs: imported when used

    parse_size(value)
    return value


def _export_dest(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a folder or s3://bucket/prefix")
    return value


class Export(BaseModel):
    """`[export]`: when the job has ended, the dispatcher exports it (farm/export.py) to `dest`."""

    model_config = _STRICT
    format: Literal["imagefolder", "webdataset", "parquet"]
    #: A folder on the dispatcher's host (relative to the spec file), or s3://bucket/prefix.
    dest: Annotated[str, AfterValidator(_export_dest)]
    shard_size: Annotated[int, _Range(1, MAX_ITEMS)] = 10_000
    shard_bytes: Annotated[str, AfterValidator(_shard_bytes)] | None = None


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """Hires fix's second-pass size, as the webui rounds it (down to a multiple of 8)."""
    return int(width * scale) // 8 * 8, int(height * scale) // 8 * 8


def _seeds_form(value: Any) -> str:
    return "range" if isinstance(value, (dict, SeedRange)) else "list"


Seeds = Annotated[
    Union[
        Annotated[SeedRange, Tag("range")],
        Annotated[list[Seed], AfterValidator(_not_empty("seed")), Field(max_length=MAX_ITEMS), Tag("list")],
    ],
    Discriminator(_seeds_form),
]


class JobSpec(BaseModel):
    """One job: prompts x seeds x grid values, each combination one image."""

    model_config = _STRICT

    name: Annotated[str, AfterValidator(_job_name)] | None = None
    #: "interactive" is served before "batch"; `farm submit --lane` overrides it.
    lane: Literal["interactive", "batch"] = "batch"
    #: Within a lane, higher runs first; jobs of equal priority share the pool by user.
    priority: Annotated[int, _Range(-100, 100)] = 0
    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    model: ModelRef = "tiny-sd"
    prompts: Annotated[list[Prompt], AfterValidator(_not_empty("prompt")), Field(max_length=MAX_ITEMS)]
    negative_prompt: NegativePrompt = ""
    seeds: Seeds = [-1]
    steps: Steps = 20
    cfg_scale: CfgScale = 7.0
    sampler: SamplerName = "Euler a"
    schedule_type: ScheduleName = "Automatic"
    width: Side = 512
    height: Side = 512
    #: Images rendered in one forward pass. Part of the job, not of the worker,
    #: because the batch an image is drawn in changes its bytes by rounding.
    batch_size: Annotated[int, _Range(1, 64)] = 4
    clip_skip: ClipSkip = 1
    #: How `(word:1.2)` weights apply, as the webui's "Emphasis mode" (farm.prompts).
    emphasis: Emphasis = "Original"
    #: A VAE that replaces the model's own: a diffusers AutoencoderKL folder.
    vae: Annotated[str, AfterValidator(_model)] | None = None
    hires: Hires | None = None
    # Seeds beyond the plain seed, as the webui's "Extra" seed options.
    variation_seed: Seed | None = None
    variation_strength: Strength = 0.0
    resize_seed_from: Annotated[list[Side], Field(min_length=2, max_length=2)] | None = None
    # img2img and inpaint.
    init_image: ImageRef | Annotated[list[ImageRef], AfterValidator(_not_empty("image"))] | None = None
    denoising_strength: Strength = 0.75
    #: Take exactly `steps` denoising steps, as the webui's "img2img_fix_steps" option does.
    fix_steps: bool = False
    resize_mode: ResizeModeValue = 0
    # inpaint.
    mask: ImageRef | None = None
    mask_blur: MaskBlur = 4
    masked_content: MaskedContent = "original"
    inpaint_area: Literal["whole", "only masked"] = "whole"
    padding: Annotated[int, _Range(0, 256)] = 32
    invert_mask: bool = False
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    #: LoRAs the job brings, by the name its prompts give them (`<lora:NAME:W>`): a local
    #: .safetensors file, uploaded to the job's store at submission, or a store: key. They are
    #: found before the operator's FARM_LORA_DIR.
    loras: dict[LoraName, LoraRef] = Field(default_factory=dict)
    #: Export the job as a dataset once it has ended (farm export).
    export: Export | None = None
    #: Receives a signed POST of the job's summary when it ends (farm/webhooks.py).
    webhook: Annotated[str, AfterValidator(_webhook_url)] | None = None
    #: Also POST each stored image's record to `webhook`, as it is stored.
    webhook_each: bool = False

    @model_validator(mode="after")
    def _check_whole(self) -> "JobSpec":
        problems = list(_grid_problems(self.grid))
        problems += _sampler_problems(self)
        problems += _mode_problems(self)
        problems += _prompt_sr_problems(self)
        if self.webhook_each and not self.webhook:
            problems.append(("webhook_each", "needs a webhook URL to post to"))
        if not problems and self.item_count > MAX_ITEMS:
            problems.append(("grid", f"the job expands to {self.item_count} images; at most {MAX_ITEMS}"))
        if problems:
            raise SpecError(problems)
        return self

    def named_loras(self) -> dict[str, list[int]]:
        """Each LoRA the job names (in its prompts and its prompt_sr values), with the prompts
        that name it; for the submission's check against the LoRA folder."""
        found: dict[str, list[int]] = {}
        texts = list(self.prompts) + [str(v) for v in self.grid.get(PROMPT_SR, [])]
        for i, text in enumerate(texts):
            for lora in prompts.extra_networks(text)[1]:
                found.setdefault(lora.name, []).append(i)
        return found

    @property
    def init_images(self) -> list[str]:
        if self.init_image is None:
            return []
        return [self.init_image] if isinstance(self.init_image, str) else list(self.init_image)

    @property
    def seed_count(self) -> int:
        return self.seeds.count if isinstance(self.seeds, SeedRange) else len(self.seeds)

    @property
    def item_count(self) -> int:
        total = len(self.prompts) * self.seed_count * max(1, len(self.init_images))
        for values in self.grid.values():
            total *= len(values)
        return total

    def seed_at(self, position: int) -> int:
        if isinstance(self.seeds, SeedRange):
            return self.seeds.start + position
        return self.seeds[position]

    def with_resolved_seeds(self, rng: random.Random | None = None) -> "JobSpec":
        """Replace every -1 with a random seed, as the webui does, so job.json records what ran."""
        rng = rng or random.SystemRandom()
        seeds = self.seeds
        if isinstance(seeds, SeedRange):
            if seeds.start == -1:
                start = rng.randrange(0, MAX_SEED - seeds.count + 1)
                seeds = SeedRange(start=start, count=seeds.count)
        elif -1 in seeds:
            seeds = [rng.randrange(0, MAX_SEED) if s == -1 else s for s in seeds]
        return self.model_copy(update={"seeds": seeds})

    def to_json_dict(self) -> dict:
        """Every field that means something in this mode, defaults included; parses back to the same spec."""
        if self.mode == "txt2img":
            irrelevant = _IMAGE_FIELDS + _INPAINT_FIELDS
        elif self.mode == "img2img":
            irrelevant = _INPAINT_FIELDS + _TXT2IMG_ONLY
        else:
            irrelevant = _TXT2IMG_ONLY
        return self.model_dump(mode="json", exclude_none=True, exclude=set(irrelevant))


def _grid_problems(grid: dict[str, list[Any]]):
    for axis, values in grid.items():
        where = f"grid.{axis}"
        if axis not in GRID_AXES:
            yield where, f"unknown axis; accepted: {', '.join(GRID_AXES)}"
            continue
        if not values:
            yield where, "must list at least one value"
            continue
        adapter = _field_adapter(axis)
        for i, value in enumerate(values):
            try:
                adapter.validate_python(value, strict=True)
            except ValidationError as e:
                for field, reason in _problems(e):
                    yield f"{where}[{i}]", reason


def _prompt_sr_problems(spec: JobSpec):
    values = spec.grid.get(PROMPT_SR)
    if not values or not isinstance(values[0], str):
        return
    negatives = [n for n in spec.grid.get("negative_prompt", [spec.negative_prompt]) if isinstance(n, str)]
    missing = [i for i, prompt in enumerate(spec.prompts)
               if values[0] not in prompt and not all(values[0] in n for n in negatives)]
    if missing:
        shown = ", ".join(f"prompts.{i}" for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
        yield f"grid.{PROMPT_SR}", (f"the first value {values[0]!r} is what each prompt's text is searched for, "
                                    f"and it is neither in {shown} nor in its negative prompt")


def _sampler_problems(spec: JobSpec):
    sampler_values = spec.grid.get("sampler", [spec.sampler])
    schedule_values = spec.grid.get("schedule_type", [spec.schedule_type])
    seen = set()
    for sampler in sampler_values:
        for schedule in schedule_values:
            if not isinstance(sampler, str) or not isinstance(schedule, str):
                continue  # already reported as a type error
            try:
                samplers.resolve(sampler, schedule)
            except samplers.SamplerChoiceError as e:
                field = "grid.sampler" if "sampler" in spec.grid else "sampler"
                if str(e) not in seen:
                    seen.add(str(e))
                    yield field, str(e)


def _is_inpainting_model(model: str) -> bool:
    """A 9-channel UNet, read from a folder's unet/config.json or a file's header, loading nothing."""
    if model in INPAINTING_BUILTINS:
        return True
    if model.endswith(".safetensors"):
        try:
            return checkpoints.detect(Path(model)).inpainting
        except ModelError:
            return False
    config = Path(model) / "unet" / "config.json"
    try:
        return json.loads(config.read_text()).get("in_channels") == 9
    except (OSError, ValueError, AttributeError):
        return False


def _mode_problems(spec: JobSpec):
    given = spec.model_fields_set | set(spec.grid)
    if spec.mode != "inpaint":
        for model in spec.grid.get("model", [spec.model]):
            if isinstance(model, str) and _is_inpainting_model(model):
                yield "model", f"{Path(model).name} is an inpainting model (9-channel UNet); use mode = \"inpaint\""
    if spec.mode == "txt2img":
        for name in _IMAGE_FIELDS + _INPAINT_FIELDS:
            if name in given:
                yield name, 'only for mode = "img2img" or "inpaint"'
    else:
        if spec.init_image is None:
            yield "init_image", f"required for mode = {spec.mode!r}"
        for name in _TXT2IMG_ONLY:
            if name in given:
                yield name, 'supported for mode = "txt2img" only so far'
        if spec.fix_steps and 0 in spec.grid.get("denoising_strength", [spec.denoising_strength]):
            yield "denoising_strength", "must be above 0 with fix_steps (the webui divides by it)"
    if spec.mode == "img2img":
        for name in _INPAINT_FIELDS:
            if name in given:
                yield name, 'only for mode = "inpaint"'
    if spec.mode == "inpaint" and spec.mask is None:
        yield "mask", 'required for mode = "inpaint"'
    if spec.mode == "inpaint" and spec.resize_mode == ResizeMode.LATENT_UPSCALE:
        yield "resize_mode", 'latent upscale is supported for mode = "img2img" only so far'
    if spec.hires:
        for w, h in itertools.product(spec.grid.get("width", [spec.width]), spec.grid.get("height", [spec.height])):
            if isinstance(w, int) and isinstance(h, int) and max(spec.hires.size(w, h)) > 2048:
                big = "x".join(map(str, spec.hires.size(w, h)))
                yield "hires.scale", f"{w}x{h} scaled by {spec.hires.scale:g} is {big}; at most 2048 a side"


@cache
def _field_adapter(name: str) -> TypeAdapter:
    """A grid axis' values are checked as the field itself: its type and validators, without None."""
    if name == PROMPT_SR:
        return TypeAdapter(Prompt)
    field = JobSpec.model_fields[name]
    annotation = field.annotation
    if type(None) in get_args(annotation):
        annotation = Union[tuple(a for a in get_args(annotation) if a is not type(None))]
    return TypeAdapter(Annotated[(annotation, *field.metadata)] if field.metadata else annotation)


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    out = []
    for e in error.errors():
        loc = ".".join(str(p) for p in e["loc"] if str(p) not in ("range", "list"))
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required"
        elif isinstance(e.get("ctx", {}).get("error"), SpecError):
            out.extend(e["ctx"]["error"].problems)
            continue
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] not in ("value_error", "assertion_error") and "input" in e:
                msg += f", got {_short(e['input'])}"
        out.append((loc or "spec", msg))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_spec(data: Any, base_dir: Path | None = None, allow_pickle: bool = False) -> JobSpec:
    """Validate a decoded spec (a dict from TOML or JSON) into a JobSpec. `allow_pickle` is the
    operator's opt-in to pickle checkpoints (Settings.allow_pickle)."""
    if not isinstance(data, dict):
        raise SpecError.single("spec", f"must be a table of keys, got {type(data).__name__}")
    data = dict(data)
    if "prompts_file" in data:
        data["prompts"] = _read_prompts_file(data, base_dir or Path.cwd())
    if isinstance(data.get("sampler"), str) and "schedule_type" not in data:
        sampler, schedule = samplers.split_combined(data["sampler"])
        if schedule:
            data["sampler"], data["schedule_type"] = sampler, schedule
    model = data.get("model")
    pickled = isinstance(model, str) and model.lower().endswith(PICKLE_SUFFIXES)
    if isinstance(model, str) and model and model not in BUILTIN_MODELS and (allow_pickle or not pickled):
        data["model"] = _resolve_model_path(model, base_dir or Path.cwd())
    vae = data.get("vae")
    if isinstance(vae, str) and vae and not vae.lower().endswith(PICKLE_SUFFIXES):
        data["vae"] = _resolve_model_path(vae, base_dir or Path.cwd(), "vae")
    try:
        spec = JobSpec.model_validate(data, context={"allow_pickle": allow_pickle})
    except ValidationError as e:
        raise SpecError(_problems(e)) from None
    spec = _with_checked_loras(spec, base_dir or Path.cwd())
    if spec.export and "://" not in spec.export.dest:
        dest = str((base_dir or Path.cwd()) / Path(spec.export.dest).expanduser())
        spec = spec.model_copy(update={"export": spec.export.model_copy(update={"dest": dest})})
    return _with_checked_images(spec, base_dir or Path.cwd())


def _with_checked_loras(spec: JobSpec, base_dir: Path) -> JobSpec:
    """The job's own LoRA files as absolute paths, each checked to be a file; store: keys are
    checked at submission."""
    resolved, problems = {}, []
    for name, ref in spec.loras.items():
        if ref.startswith(STORE_PREFIX):
            resolved[name] = ref
            continue
        path = (base_dir / ref).expanduser().resolve()
        if not path.is_file():
            problems.append((f"loras.{name}", f"no such file: {path}"))
        resolved[name] = str(path)
    if problems:
        raise SpecError(problems)
    return spec.model_copy(update={"loras": resolved}) if resolved else spec


def _with_checked_images(spec: JobSpec, base_dir: Path) -> JobSpec:
    """Resolve local init images and masks, check each decodes, and that masks fit their images."""
    if spec.mode == "txt2img":
        return spec
    problems: list[tuple[str, str]] = []
    sizes: dict[str, tuple[int, int]] = {}
    resolved = []
    for i, ref in enumerate(spec.init_images):
        field = "init_image" if isinstance(spec.init_image, str) else f"init_image[{i}]"
        path, size = _check_image(ref, base_dir, field, problems)
        resolved.append(path)
        if size:
            sizes[path] = size
    mask = None
    if spec.mask is not None:
        mask, mask_size = _check_image(spec.mask, base_dir, "mask", problems)
        for path, size in sizes.items():
            if mask_size and size != mask_size:
                problems.append(("mask", f"is {mask_size[0]}x{mask_size[1]} but init image {Path(path).name} "
                                         f"is {size[0]}x{size[1]}; they must be the same size"))
    if problems:
        raise SpecError(problems)
    init = resolved[0] if isinstance(spec.init_image, str) else resolved
    return spec.model_copy(update={"init_image": init, "mask": mask})


def _check_image(ref: str, base_dir: Path, field: str, problems: list) -> tuple[str, tuple[int, int] | None]:
    """A local image's absolute path and size; a store: key is checked at submission."""
    if ref.startswith(STORE_PREFIX):
        return ref, None
    from PIL import Image, UnidentifiedImageError

    path = (base_dir / ref).expanduser().resolve()
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            problems.append((field, f"{path.name} is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB"))
            return str(path), None
        with Image.open(path) as img:
            img.verify()
            size = img.size
    except FileNotFoundError:
        problems.append((field, f"no such file: {path}"))
        return str(path), None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        problems.append((field, f"{path.name} is not a readable image ({type(e).__name__})"))
        return str(path), None
    if max(size) > MAX_IMAGE_SIDE:
        problems.append((field, f"{path.name} is {size[0]}x{size[1]}; at most {MAX_IMAGE_SIDE} a side"))
    return str(path), size


def _read_prompts_file(data: dict, base_dir: Path) -> list[str]:
    path = data.pop("prompts_file")
    if "prompts" in data:
        raise SpecError.single("prompts_file", "give either prompts or prompts_file, not both")
    if not isinstance(path, str):
        raise SpecError.single("prompts_file", f"must be a path, got {_short(path)}")
    full = (base_dir / path).expanduser()
    try:
        text = full.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError.single("prompts_file", f"no such file: {full}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError.single("prompts_file", f"cannot read {full}: {e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SpecError.single("prompts_file", f"{full} holds no prompts (one per line)")
    return prompts


def _resolve_model_path(model: str, base_dir: Path, field: str = "model") -> str:
    path = (base_dir / model).expanduser()
    if not path.exists():
        builtin = f" (built-in: {', '.join(BUILTIN_MODELS)})" if field == "model" else ""
        raise SpecError.single(field, f"no {'built-in model or ' if builtin else ''}local path {model!r}{builtin}")
    if path.is_file() and field == "model":
        _check_checkpoint(path)
    return str(path.resolve())


def _check_checkpoint(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return  # allowed by the operator; only the worker may unpickle it, to find its family
    if path.suffix.lower() != ".safetensors":
        raise SpecError.single("model", f"{path.name}: a model is a diffusers folder or a .safetensors checkpoint")
    try:
        family = checkpoints.detect(path)
    except ModelError as e:
        raise SpecError.single("model", str(e)) from None
    if not family.supported:
        raise SpecError.single("model", f"{path.name} is an {family.name} checkpoint; from single files farm loads "
                                        f"{', '.join(checkpoints.SUPPORTED)} so far (a diffusers folder of any family works)")


def load_spec(path: str | Path, allow_pickle: bool = False) -> JobSpec:
    """Read and validate a spec file; TOML unless its name ends in .json."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError.single("spec", f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError.single("spec", f"{path} is {len(raw)} bytes; at most {MAX_SPEC_BYTES}")
    return parse_spec(decode_spec(raw, json_format=path.suffix.lower() == ".json"), path.parent, allow_pickle)


def decode_spec(raw: bytes, json_format: bool = False) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError.single("spec", "is not UTF-8 text") from None
    try:
        return json.loads(text) if json_format else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        kind = "JSON" if json_format else "TOML"
        raise SpecError.single("spec", f"is not valid {kind}: {e}") from None
