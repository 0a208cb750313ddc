"""Where a LoRA named in a prompt lives: `<FARM_LORA_DIR>/<name>.safetensors`. Shared by the
submission's check (before anything is queued) and the worker that loads it."""

from __future__ import annotations

from pathlib import Path

from farm.spec import PICKLE_SUFFIXES


def find(folder: Path | None, name: str) -> Path:
    """The LoRA's file; ValueError says why there is none."""
    if folder is None:
        raise ValueError(f"<lora:{name}>: this farm has no LoRA folder (FARM_LORA_DIR)")
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"<lora:{name}>: a LoRA is named by its file name in the LoRA folder")
    path = folder / f"{name}.safetensors"
    if path.is_file():
        return path
    for suffix in PICKLE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            raise ValueError(f"<lora:{name}>: {name}{suffix} is a pickle-format LoRA, which farm never loads; "
                             "convert it to .safetensors")
    raise ValueError(f"<lora:{name}>: no {name}.safetensors in the LoRA folder {folder}")


def check(spec, folder: Path | None) -> list[tuple[str, str]]:
    """(field, reason) for each LoRA of the job that cannot be loaded."""
    problems = []
    prompt_count = len(spec.prompts)
    for name, where in spec.loras().items():
        try:
            find(folder, name)
        except ValueError as e:
            first = where[0]
            field = f"prompts.{first}" if first < prompt_count else f"grid.prompt_sr[{first - prompt_count}]"
            problems.append((field, str(e)))
    return problems
