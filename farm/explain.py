"""`farm explain SPEC`: what a job will do, before anyone spends GPU time on it.

The item and chunk counts and batch sizes come from the plan; the models and LoRA sets from its
cells and prompts; the timesteps each sampler visits from diffusers itself (workers.timesteps,
run in a process of its own where diffusers is installed); the GPU time from the pool's
measured seconds per image-step (`farm:pace`, written by the workers) when Redis answers, else
from the figures measured for farm's built-in models (MEASURED), scaled by pixel count.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

from farm import keys, prompts, samplers
from farm.denoise import img2img_steps
from farm.plan import Item, Plan

#: Seconds per image per denoising step measured on this project's build machine (2 CPU cores,
#: torch CPU, batches of 8, 64x64): a floor for a dry run when no pool has measured the model.
MEASURED = {
    ("shapes-sd", 64, 64): 0.0097,
    ("tiny-sd", 64, 64): 0.0069,
    ("tiny-sd-inpaint", 64, 64): 0.0069,
}


def denoising_steps(item: Item) -> int:
    """The denoising steps an item's image takes: img2img's executed steps, plus hires fix's."""
    if item.mode != "txt2img":
        steps = img2img_steps(item.steps, item.denoising_strength or 0.0, item.fix_steps).run
    else:
        steps = item.steps
    if item.hires:
        strength = item.hires.denoising_strength
        steps += img2img_steps(item.hires.steps or item.steps, strength, fix_steps=strength > 0).run
    return samplers.SAMPLERS[item.sampler].evaluations(steps)


@dataclass(frozen=True)
class Run:
    """A distinct way items are sampled: what decides the timesteps visited."""

    model: str
    sampler: str
    schedule_type: str
    steps: int
    mode: str
    strength: float | None = None
    fix_steps: bool = False


@dataclass
class Explanation:
    items: int
    chunks: int
    #: Batch size -> how many chunks have it.
    batch_sizes: dict[int, int]
    models: list[str]
    lora_sets: list[str]
    #: Each Run with its item count and the timesteps of its model evaluations (or why not).
    runs: list[dict] = field(default_factory=list)
    #: Estimated seconds of GPU time, and where the figures came from; None without figures.
    seconds: float | None = None
    pace_source: str = ""
    unestimated: list[str] = field(default_factory=list)

    @property
    def model_loads(self) -> int:
        """At best: each model loaded once."""
        return len(self.models)

    def to_json(self) -> dict:
        return {**asdict(self), "model_loads": self.model_loads}


def explain(plan: Plan, pace: dict[str, float] | None = None) -> Explanation:
    spec = plan.spec
    sizes: Counter[int] = Counter()
    full, rest = divmod(plan.cell_size, spec.batch_size)
    if full:
        sizes[spec.batch_size] += full * plan.cells
    if rest:
        sizes[rest] += plan.cells
    runs: Counter[Run] = Counter()
    loras: set[str] = set()
    seconds, unestimated, sources = 0.0, set(), set()
    for cell in range(plan.cells):
        for prompt in range(len(spec.prompts)):
            item = plan.item(cell * plan.cell_size + prompt * spec.seed_count)
            runs[_run(item)] += spec.seed_count
            refs = prompts.extra_networks(item.prompt)[1]
            if refs:
                loras.add(", ".join(ref.shown for ref in refs))
            figure, source = _pace(item, pace)
            if figure is None:
                unestimated.add(f"{item.model} {item.width}x{item.height}")
            else:
                seconds += figure * denoising_steps(item) * spec.seed_count
                sources.add(source)
    return Explanation(
        items=plan.item_count, chunks=plan.chunk_count, batch_sizes=dict(sorted(sizes.items(), reverse=True)),
        models=list(dict.fromkeys(plan.models)), lora_sets=sorted(loras),
        runs=[{"run": asdict(run), "items": count} for run, count in runs.items()],
        seconds=seconds if sources else None, pace_source=", ".join(sorted(sources)),
        unestimated=sorted(unestimated))


def _run(item: Item) -> Run:
    image_mode = item.mode != "txt2img"
    return Run(item.model, item.sampler, item.schedule_type, item.steps, item.mode,
               item.denoising_strength if image_mode else None, item.fix_steps)


def _pace(item: Item, pace: dict[str, float] | None) -> tuple[float | None, str]:
    measured = (pace or {}).get(keys.pace_field(item.model, item.width, item.height))
    if measured is not None:
        return measured, "the pool's measurements"
    for (model, width, height), figure in MEASURED.items():
        if model == item.model:
            return figure * item.width * item.height / (width * height), "farm's measured figures (2 CPU cores)"
    return None, ""


def read_pace(client) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in client.hgetall(keys.PACE).items()}


def add_timesteps(explanation: Explanation) -> str | None:
    """Fill each run's `timesteps` from diffusers (in a process of its own); None, or why not."""
    if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("workers") is None:
        return "the timesteps need diffusers: pip install 'farm[worker]'"
    runs = [entry["run"] for entry in explanation.runs]
    result = subprocess.run([sys.executable, "-m", "workers.timesteps"], input=json.dumps(runs),
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        return f"the timesteps could not be computed: {result.stderr.strip().splitlines()[-1:]}"
    for entry, answer in zip(explanation.runs, json.loads(result.stdout)):
        entry.update(answer)
    return None
