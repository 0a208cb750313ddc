"""`farm explain`: a dry run that needs no GPU and no Redis: counts and batch sizes from the plan,
the timesteps diffusers will visit (checked against the schedulers themselves), models and LoRA
sets, and an estimate of GPU time from the pool's measurements when there are some."""

from __future__ import annotations

import io
import json

import pytest

from farm import explain, keys
from farm.plan import Plan
from farm.spec import parse_spec
from tests.conftest import run_farm


def _plan(**changes) -> Plan:
    spec = {"model": "shapes-sd", "prompts": ["a red circle <lora:shapes-ring:0.5>", "a blue square"],
            "seeds": {"start": 1, "count": 10}, "steps": 20, "width": 64, "height": 64, "batch_size": 4,
            "grid": {"cfg_scale": [3.0, 7.0], "model": ["shapes-sd", "tiny-sd"]}}
    return Plan(parse_spec({**spec, **changes}), "explain")


def test_counts_batches_models_and_lora_sets_come_from_the_plan():
    result = explain.explain(_plan())
    # 4 cells of 2 prompts x 10 seeds: chunks of 4, 4, 4, 4, 4 per cell.
    assert (result.items, result.chunks, result.batch_sizes) == (80, 20, {4: 20})
    odd = explain.explain(_plan(batch_size=8))
    assert odd.batch_sizes == {8: 8, 4: 4} and odd.chunks == 12
    assert result.models == ["shapes-sd", "tiny-sd"] and result.model_loads == 2
    assert result.lora_sets == ["<lora:shapes-ring:0.5>"]
    assert sum(entry["items"] for entry in result.runs) == 80


def test_gpu_time_uses_the_pools_measured_pace_when_there_is_one():
    plan = _plan(grid={})
    table = explain.explain(plan)
    assert table.seconds == pytest.approx(20 * 20 * explain.MEASURED[("shapes-sd", 64, 64)])
    assert "farm's measured figures" in table.pace_source
    pooled = explain.explain(plan, {keys.pace_field("shapes-sd", 64, 64): 0.5})
    assert pooled.seconds == pytest.approx(20 * 20 * 0.5) and pooled.pace_source == "the pool's measurements"
    unknown = explain.explain(Plan(parse_spec({"prompts": ["x"], "model": "tiny-sd", "width": 512, "height": 512,
                                                "sampler": "Heun", "seeds": [1]}), "explain"),
                              {keys.pace_field("tiny-sd", 512, 512): 0.01})
    assert unknown.seconds == pytest.approx(20 * 2 * 0.01)  # Heun evaluates the model twice a step


@pytest.mark.parametrize("sampler, schedule, mode", [("DDIM", "Automatic", "txt2img"), ("Euler a", "Automatic", "txt2img"),
                                                     ("DPM++ 2M", "Karras", "img2img"), ("Heun", "Automatic", "img2img")])
def test_the_timesteps_are_those_the_scheduler_visits(sampler, schedule, mode):
    from diffusers import DDIMScheduler

    from workers.schedulers import make_scheduler
    from workers.timesteps import scheduler_config, timesteps

    changes = {"sampler": sampler, "schedule_type": schedule, "steps": 50, "grid": {}}
    if mode == "img2img":
        changes.update(mode="img2img", init_image="store:x.png", denoising_strength=0.75, steps=20)
    [entry] = explain.explain(_plan(**changes)).runs
    # What `farm explain` asks workers.timesteps for, in a process of its own (the CLI test below).
    entry["timesteps"] = timesteps(entry["run"])
    scheduler = make_scheduler(scheduler_config("shapes-sd"), sampler, schedule)
    if mode == "txt2img":
        scheduler.set_timesteps(50)
        assert entry["timesteps"] == [float(t) for t in scheduler.timesteps]
        if sampler == "DDIM":
            # shapes-sd spaces its schedule as SD 1.5's diffusers config does ("linspace")
            assert entry["timesteps"][:3] == [999.0, 979.0, 958.0] and entry["timesteps"][-1] == 0.0
            leading = DDIMScheduler(steps_offset=0, timestep_spacing="leading")
            leading.set_timesteps(50)
            assert [int(t) for t in leading.timesteps][:2] == [980, 960]
    else:
        scheduler.set_timesteps(20)
        # The webui's img2img: 0.75 of 20 steps runs the last int(0.75 * 20) + 1 = 16 of them.
        assert entry["timesteps"] == [float(t) for t in scheduler.timesteps[(20 - 16) * scheduler.order:]]


def test_farm_explain_runs_without_redis_and_prints_json(tmp_path, monkeypatch):
    (tmp_path / "job.toml").write_text('model = "shapes-sd"\nprompts = ["a red circle"]\nseeds = [1, 2, 3]\n'
                                       'steps = 10\nsampler = "DDIM"\nwidth = 64\nheight = 64\n')
    result = run_farm("explain", str(tmp_path / "job.toml"), "--json", env={"FARM_BROKER_URL": ""})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["items"] == 3 and data["runs"][0]["timesteps"][0] == 999.0 and len(data["runs"][0]["timesteps"]) == 10
    # The same figures as a person reads them (printed in this process: a second `farm explain`
    # would import diffusers again for the same answer).
    from rich.console import Console

    from farm import cli
    from farm.explain import Explanation

    monkeypatch.setattr(cli, "out", Console(file=io.StringIO(), width=200))
    fields = {k: v for k, v in data.items() if k not in ("model_loads", "timesteps_note")}
    cli._say_explanation(Explanation(**{**fields, "batch_sizes": {int(k): v for k, v in data["batch_sizes"].items()}}),
                         data["timesteps_note"])
    text = cli.out.file.getvalue()
    assert "3 images in 1 chunks (1 of 3)" in text and "GPU time: about" in text
    assert "10 model evaluations at timesteps [999, 888," in text
