"""Samplers and schedule types by their AUTOMATIC1111 webui names.

This module is plain data: which diffusers scheduler class, with which options,
is the faithful counterpart of each webui sampler. Workers build the scheduler
from it; the dispatcher validates names against it without any GPU stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ScheduleType(str, Enum):
    AUTOMATIC = "Automatic"
    KARRAS = "Karras"
    EXPONENTIAL = "Exponential"


#: The diffusers config flag that selects each schedule type.
SCHEDULE_FLAGS: dict[ScheduleType, dict[str, bool]] = {
    ScheduleType.AUTOMATIC: {},
    ScheduleType.KARRAS: {"use_karras_sigmas": True},
    ScheduleType.EXPONENTIAL: {"use_exponential_sigmas": True},
}

_SIGMA_SCHEDULES = (ScheduleType.AUTOMATIC, ScheduleType.KARRAS, ScheduleType.EXPONENTIAL)
# Euler a, DDIM, PLMS and LCM silently ignore the sigma flags in diffusers 0.42,
# so a schedule other than their own would be a lie in the infotext.
_OWN_SCHEDULE_ONLY = (ScheduleType.AUTOMATIC,)


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: str
    options: dict = field(default_factory=dict)
    #: What "Automatic" means for this sampler in the webui.
    default_schedule: ScheduleType = ScheduleType.AUTOMATIC
    schedules: tuple[ScheduleType, ...] = _SIGMA_SCHEDULES
    #: Python modules the worker needs for this scheduler.
    needs: tuple[str, ...] = ()
    #: Evaluates the model twice a step: the webui counts prompt-editing steps in evaluations.
    second_order: bool = False

    def evaluations(self, steps: int) -> int:
        """The steps a prompt's schedule is counted over, as the webui's `total_steps`."""
        return steps * 2 if self.second_order else steps


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("DPM++ 2M", "DPMSolverMultistepScheduler",
                {"algorithm_type": "dpmsolver++", "solver_order": 2},
                default_schedule=ScheduleType.KARRAS),
        # Its Brownian noise comes from its own trees, not the generators; the worker seeds one
        # tree per image with the image's seed (noise_sampler_seed), as the webui does.
        Sampler("DPM++ SDE", "DPMSolverSDEScheduler", default_schedule=ScheduleType.KARRAS, needs=("torchsde",),
                second_order=True),
        Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                default_schedule=ScheduleType.EXPONENTIAL),
        Sampler("DPM++ 3M SDE", "DPMSolverMultistepScheduler",
                {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
                default_schedule=ScheduleType.EXPONENTIAL),
        Sampler("Euler a", "EulerAncestralDiscreteScheduler", schedules=_OWN_SCHEDULE_ONLY),
        Sampler("Euler", "EulerDiscreteScheduler"),
        Sampler("LMS", "LMSDiscreteScheduler", needs=("scipy",)),
        Sampler("Heun", "HeunDiscreteScheduler", second_order=True),
        Sampler("DPM2", "KDPM2DiscreteScheduler", default_schedule=ScheduleType.KARRAS, second_order=True),
        Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler", default_schedule=ScheduleType.KARRAS,
                second_order=True),
        # DDIM's own default clip_sample=True makes SD chaotic; the webui never clips.
        Sampler("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False},
                schedules=_OWN_SCHEDULE_ONLY),
        Sampler("PLMS", "PNDMScheduler", {"skip_prk_steps": True}, schedules=_OWN_SCHEDULE_ONLY),
        # The webui runs UniPC as bh1, order 3; without sigma_min as the final
        # sigma diffusers 0.42 returns NaN at the last step.
        Sampler("UniPC", "UniPCMultistepScheduler",
                {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
        Sampler("LCM", "LCMScheduler", schedules=_OWN_SCHEDULE_ONLY),
    )
}

#: Webui samplers that diffusers has no faithful counterpart for, with the reason.
UNSUPPORTED: dict[str, str] = {
    "DPM++ 2S a": "diffusers has no faithful counterpart of DPM++ 2S a",
    "DPM fast": "diffusers has no counterpart of DPM fast",
    "DPM adaptive": "diffusers has no counterpart of DPM adaptive",
    "Restart": "diffusers has no counterpart of Restart",
}


class SamplerChoiceError(ValueError):
    """A sampler name or sampler/schedule combination that farm will not run."""


def accepted_names() -> str:
    return ", ".join(SAMPLERS)


def split_combined(name: str) -> tuple[str, str | None]:
    """Split an old combined webui name such as "DPM++ 2M Karras" into its two parts."""
    for schedule in (ScheduleType.KARRAS, ScheduleType.EXPONENTIAL):
        suffix = " " + schedule.value
        if name.endswith(suffix) and name[: -len(suffix)] in SAMPLERS:
            return name[: -len(suffix)], schedule.value
    return name, None


def resolve(name: str, schedule: str = "Automatic") -> tuple[Sampler, ScheduleType]:
    """The sampler and the concrete schedule type for a webui sampler name.

    "Automatic" resolves to the sampler's own default, as the webui records it.
    Raises SamplerChoiceError naming the accepted values on anything else.
    """
    base, combined_schedule = split_combined(name)
    if combined_schedule is not None:
        if schedule not in ("Automatic", combined_schedule):
            raise SamplerChoiceError(
                f"{name!r} already names the {combined_schedule} schedule, "
                f"which contradicts schedule_type {schedule!r}"
            )
        schedule = combined_schedule
    if base in UNSUPPORTED:
        raise SamplerChoiceError(f"{base!r} is not supported: {UNSUPPORTED[base]}; accepted: {accepted_names()}")
    if base not in SAMPLERS:
        raise SamplerChoiceError(f"unknown sampler {base!r}; accepted: {accepted_names()}")
    sampler = SAMPLERS[base]
    try:
        schedule_type = ScheduleType(schedule)
    except ValueError:
        raise SamplerChoiceError(
            f"unknown schedule type {schedule!r}; accepted: {', '.join(s.value for s in ScheduleType)}"
        ) from None
    if schedule_type not in sampler.schedules:
        raise SamplerChoiceError(
            f"{base} ignores the {schedule_type.value} schedule in diffusers; "
            f"accepted for {base}: {', '.join(s.value for s in sampler.schedules)}"
        )
    if schedule_type is ScheduleType.AUTOMATIC:
        schedule_type = sampler.default_schedule
    return sampler, schedule_type
