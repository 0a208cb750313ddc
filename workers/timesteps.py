"""The timesteps each sampler visits, from diffusers itself, for `farm explain`.

    echo '[{"model": "shapes-sd", "sampler": "DDIM", "schedule_type": "Automatic", "steps": 50}]' \\
        | python -m workers.timesteps

Reads a JSON list of runs (model, sampler, schedule_type, steps; for img2img `strength` and
`fix_steps`) and prints, for each, the timesteps of every model evaluation in order: the
scheduler the worker would build from the model's own scheduler config, sliced as the img2img
pipeline slices it. `farm explain` runs this in a process of its own, where diffusers is
installed, so the farm package never imports it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from farm import checkpoints
from farm.denoise import img2img_steps
from workers import shapes, single_file, tiny


def scheduler_config(ref: str) -> dict:
    """The model's own scheduler config, without loading the model."""
    if ref == shapes.NAME:
        path = shapes.MODEL_DIR / "scheduler" / "scheduler_config.json"
    elif ref in tiny.TINY_MODELS:
        return dict(tiny.SCHEDULER_CONFIG)
    elif Path(ref).is_file():
        family = checkpoints.detect(Path(ref))
        path = single_file.PACKAGED_CONFIGS / family.name / "scheduler" / "scheduler_config.json"
    else:
        path = Path(ref) / "scheduler" / "scheduler_config.json"
    return json.loads(path.read_text())


def timesteps(run: dict) -> list[float]:
    from workers.schedulers import make_scheduler

    scheduler = make_scheduler(scheduler_config(run["model"]), run["sampler"], run["schedule_type"])
    steps = run["steps"]
    if run.get("strength") is None:
        scheduler.set_timesteps(steps)
        return [float(t) for t in scheduler.timesteps]
    plan = img2img_steps(steps, run["strength"], run.get("fix_steps", False))
    scheduler.set_timesteps(plan.schedule)
    # As diffusers' img2img get_timesteps: the last int(schedule * strength) steps.
    start = max(plan.schedule - min(int(plan.schedule * plan.diffusers_strength), plan.schedule), 0)
    return [float(t) for t in scheduler.timesteps[start * scheduler.order:]]


def main() -> None:
    runs = json.load(sys.stdin)
    answers = []
    for run in runs:
        try:
            answers.append({"timesteps": timesteps(run)})
        except Exception as e:  # noqa: BLE001 - one run's problem is reported beside it
            answers.append({"error": f"{type(e).__name__}: {e}"})
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
