"""The job spec: parsed and validated once, where it enters, into an immutable object.

A spec is TOML or JSON. Every problem is reported with the field it concerns and
the reason (`steps: must be 1-150, got 0`); unknown keys are errors. Code behind
this edge trusts a JobSpec.
"""

from __future__ import annotations

import json
import random
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from farm import samplers
from farm.errors import SpecError

BUILTIN_MODELS = ("tiny-sd",)
MAX_SPEC_BYTES = 4 * 1024 * 1024
MAX_PROMPT_CHARS = 10_000
MAX_ITEMS = 10_000_000
#: Largest seed the webui draws; -1 asks for a random one.
MAX_SEED = 4294967294
#: Axes a [grid] may sweep. Seeds and prompts are axes of their own.
GRID_AXES = ("model", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule_type", "width", "height")


def _range(lo: int, hi: int):
    def check(value):
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}-{hi}, got {value!r}")
        return value

    return AfterValidator(check)


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


def _model(value: str) -> str:
    if not value:
        raise ValueError("must name a built-in model or a local model folder/file")
    return value


def _job_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
            f"got {value[:80]!r}"
        )
    return value


Steps = Annotated[int, _range(1, 150)]
CfgScale = Annotated[float, _range(1, 30)]
Side = Annotated[int, _range(64, 2048), AfterValidator(_multiple_of_8)]
Seed = Annotated[int, AfterValidator(_seed)]
Prompt = Annotated[str, AfterValidator(_prompt)]
SamplerName = Annotated[str, AfterValidator(_sampler_name)]
ScheduleName = Annotated[str, AfterValidator(_schedule_name)]
ModelRef = Annotated[str, AfterValidator(_model)]

_STRICT = ConfigDict(strict=True, extra="forbid", frozen=True)


class SeedRange(BaseModel):
    model_config = _STRICT
    start: Seed
    count: Annotated[int, _range(1, MAX_ITEMS)]


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
    mode: Literal["txt2img"] = "txt2img"
    model: ModelRef = "tiny-sd"
    prompts: Annotated[list[Prompt], AfterValidator(_not_empty("prompt")), Field(max_length=MAX_ITEMS)]
    negative_prompt: Prompt = ""
    seeds: Seeds = [-1]
    steps: Steps = 20
    cfg_scale: CfgScale = 7.0
    sampler: SamplerName = "Euler a"
    schedule_type: ScheduleName = "Automatic"
    width: Side = 512
    height: Side = 512
    #: Images rendered in one forward pass. Part of the job, not of the worker,
    #: because the batch an image is drawn in changes its bytes by rounding.
    batch_size: Annotated[int, _range(1, 64)] = 4
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_whole(self) -> "JobSpec":
        problems = list(_grid_problems(self.grid))
        problems += _sampler_problems(self)
        if not problems and self.item_count > MAX_ITEMS:
            problems.append(("grid", f"the job expands to {self.item_count} images; at most {MAX_ITEMS}"))
        if problems:
            raise SpecError(problems)
        return self

    @property
    def seed_count(self) -> int:
        return self.seeds.count if isinstance(self.seeds, SeedRange) else len(self.seeds)

    @property
    def item_count(self) -> int:
        total = len(self.prompts) * self.seed_count
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
        return self.model_dump(mode="json", exclude_none=True)


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


@cache
def _field_adapter(name: str) -> TypeAdapter:
    return TypeAdapter(JobSpec.model_fields[name].annotation if name not in _ANNOTATED else _ANNOTATED[name])


_ANNOTATED = {
    "model": ModelRef,
    "negative_prompt": Prompt,
    "steps": Steps,
    "cfg_scale": CfgScale,
    "sampler": SamplerName,
    "schedule_type": ScheduleName,
    "width": Side,
    "height": Side,
}


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


def parse_spec(data: Any, base_dir: Path | None = None) -> JobSpec:
    """Validate a decoded spec (a dict from TOML or JSON) into a JobSpec."""
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
    if isinstance(model, str) and model and model not in BUILTIN_MODELS:
        data["model"] = _resolve_model_path(model, base_dir or Path.cwd())
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(_problems(e)) from None


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


def _resolve_model_path(model: str, base_dir: Path) -> str:
    path = (base_dir / model).expanduser()
    if not path.exists():
        raise SpecError.single(
            "model", f"no built-in model or local path {model!r} (built-in: {', '.join(BUILTIN_MODELS)})"
        )
    return str(path.resolve())


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a spec file; TOML unless its name ends in .json."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpecError.single("spec", f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError.single("spec", f"{path} is {len(raw)} bytes; at most {MAX_SPEC_BYTES}")
    return parse_spec(decode_spec(raw, json_format=path.suffix.lower() == ".json"), path.parent)


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
