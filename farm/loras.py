"""Where a LoRA named in a prompt lives: the job's own `[loras]` (uploaded to its store at
submission) first, then `<FARM_LORA_DIR>/<name>.safetensors`, then the LoRAs that ship with farm
for its built-in models. Shared by the submission's check (before anything is queued) and the
worker that loads it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from farm.spec import PICKLE_SUFFIXES


def _builtin_dir() -> Path:
    # Found without importing `workers` (a dispatcher host has no torch).
    return Path(importlib.util.find_spec("workers").submodule_search_locations[0]) / "shapes" / "loras"


#: LoRAs for the built-in models (`shapes-ring` for shapes-sd).
BUILTIN_DIR = _builtin_dir()


def find(folder: Path | None, name: str) -> Path:
    """The LoRA's file; ValueError says why there is none."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"<lora:{name}>: a LoRA is named by its file name in the LoRA folder")
    for place in (folder, BUILTIN_DIR):
        if place is None:
            continue
        path = place / f"{name}.safetensors"
        if path.is_file():
            return path
        for suffix in PICKLE_SUFFIXES:
            if (place / f"{name}{suffix}").is_file():
                raise ValueError(f"<lora:{name}>: {name}{suffix} is a pickle-format LoRA, which farm never loads; "
                                 "convert it to .safetensors")
    if folder is None:
        raise ValueError(f"<lora:{name}>: this farm has no LoRA folder (FARM_LORA_DIR), and the job's [loras] "
                         "does not name it")
    raise ValueError(f"<lora:{name}>: no {name}.safetensors in the LoRA folder {folder}")


def check(spec, folder: Path | None) -> list[tuple[str, str]]:
    """(field, reason) for each LoRA of the job that cannot be loaded."""
    problems = []
    prompt_count = len(spec.prompts)
    for name, where in spec.named_loras().items():
        if name in spec.loras:
            continue
        try:
            find(folder, name)
        except ValueError as e:
            first = where[0]
            field = f"prompts.{first}" if first < prompt_count else f"grid.prompt_sr[{first - prompt_count}]"
            problems.append((field, str(e)))
    return problems
