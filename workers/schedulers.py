"""Build the diffusers scheduler for a webui sampler name and schedule type."""

from __future__ import annotations

import importlib

import diffusers

from farm import samplers
from farm.errors import ModelError


def make_scheduler(base_config, sampler_name: str, schedule_type: str, seeds: list[int] | None = None):
    """A fresh scheduler (they are stateful) from the model's own scheduler config. `seeds`, one
    per image, seed the Brownian noise of SDE schedulers that do not draw from the generators."""
    sampler, schedule = samplers.resolve(sampler_name, schedule_type)
    for module in sampler.needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise ModelError(f"sampler {sampler.name} needs the Python package {module!r} on the worker") from None
    flags = samplers.SCHEDULE_FLAGS[schedule]
    cls = getattr(diffusers, sampler.scheduler_class)
    scheduler = cls.from_config(base_config, **sampler.options, **flags)
    # diffusers ignores flags a scheduler does not know; refuse to run a schedule it dropped.
    for key, value in {**sampler.options, **flags}.items():
        if scheduler.config.get(key) != value:
            raise ModelError(f"{sampler.scheduler_class} ignored {key}={value!r}; {sampler.name} cannot run that way")
    if hasattr(scheduler, "noise_sampler_seed") and seeds is not None:
        # DPMSolverSDEScheduler otherwise seeds its Brownian tree from the global RNG.
        scheduler.noise_sampler_seed = list(seeds)
    return scheduler
