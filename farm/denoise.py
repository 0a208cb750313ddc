"""How many denoising steps img2img takes, as the webui decides it.

webui (`sd_samplers_common.setup_img2img_steps`): by default the schedule has
`steps` steps and the sampler runs the last `int(min(strength, 0.999) * steps) + 1`
of them (20 steps at 0.75 runs 16). With "img2img_fix_steps" the schedule is
stretched to `int(steps / min(strength, 0.999))` so that exactly `steps` run.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The webui never starts from pure noise in img2img: strength is capped here.
MAX_STRENGTH = 0.999


@dataclass(frozen=True)
class Img2ImgSteps:
    #: Steps of the full noise schedule.
    schedule: int
    #: Steps actually run, from the tail of that schedule.
    run: int

    @property
    def diffusers_strength(self) -> float:
        """The `strength` that makes diffusers' `get_timesteps` run exactly `run` steps of
        `schedule`: it runs `int(schedule * strength)`, so aim half a step above to be
        safe from rounding."""
        if self.run >= self.schedule:
            return 1.0
        return (self.run + 0.5) / self.schedule


def img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> Img2ImgSteps:
    capped = min(strength, MAX_STRENGTH)
    if fix_steps:
        if strength <= 0:
            raise ValueError("denoising strength must be above 0 with fix_steps")
        return Img2ImgSteps(schedule=int(steps / capped), run=steps)
    return Img2ImgSteps(schedule=steps, run=int(capped * steps) + 1)
