import json
import random

import pytest

from farm.errors import SpecError
from farm.spec import MAX_SEED, SeedRange, load_spec, parse_spec

VALID = {
    "model": "tiny-sd",
    "prompts": ["a red circle", "a blue square"],
    "seeds": {"start": 1, "count": 3},
    "steps": 20,
    "cfg_scale": 7.0,
    "sampler": "Euler a",
    "width": 64,
    "height": 64,
    "grid": {"cfg_scale": [4.0, 7.0]},
}


def test_valid_spec_expands_to_the_cartesian_product():
    spec = parse_spec(VALID)
    assert spec.item_count == 2 * 3 * 2
    assert spec.seeds == SeedRange(start=1, count=3)


def test_toml_and_json_give_the_same_spec(tmp_path):
    toml = tmp_path / "job.toml"
    toml.write_text(
        'prompts = ["a red circle", "a blue square"]\nseeds = { start = 1, count = 3 }\n'
        'width = 64\nheight = 64\nsampler = "Euler a"\n[grid]\ncfg_scale = [4.0, 7.0]\n'
    )
    js = tmp_path / "job.json"
    js.write_text(json.dumps({k: v for k, v in VALID.items() if k not in ("model", "steps", "cfg_scale")}))
    assert load_spec(toml) == load_spec(js)


def test_prompts_file_one_prompt_per_non_empty_line(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n\n  a blue square  \n")
    (tmp_path / "job.toml").write_text('prompts_file = "prompts.txt"\n')
    assert load_spec(tmp_path / "job.toml").prompts == ["a red circle", "a blue square"]


def test_random_seeds_are_resolved_and_in_the_webui_range():
    spec = parse_spec({"prompts": ["x"], "seeds": [-1, 5, -1]}).with_resolved_seeds(random.Random(1))
    assert spec.seeds[1] == 5
    assert all(0 <= s < MAX_SEED for s in spec.seeds) and -1 not in spec.seeds
    ranged = parse_spec({"prompts": ["x"], "seeds": {"start": -1, "count": 4}}).with_resolved_seeds()
    assert ranged.seeds.start >= 0 and ranged.seeds.start + 3 <= MAX_SEED


def test_combined_sampler_name_is_split():
    spec = parse_spec({**VALID, "sampler": "DPM++ 2M Karras"})
    assert (spec.sampler, spec.schedule_type) == ("DPM++ 2M", "Karras")


def _with(**changes):
    spec = {**VALID, **changes}
    return {k: v for k, v in spec.items() if v is not None}


BAD = [
    ("steps: must be 1-150, got 0", _with(steps=0)),
    ("steps: must be 1-150, got 151", _with(steps=151)),
    ("steps: Input should be a valid integer", _with(steps="20")),
    ("width: must be a multiple of 8, got 100", _with(width=100)),
    ("height: must be 64-2048, got 4096", _with(height=4096)),
    ("cfg_scale: must be 1-30", _with(cfg_scale=31.0)),
    ("frobnicate: unknown key", _with(frobnicate=1)),
    ("prompts: must list at least one prompt", _with(prompts=[])),
    ("prompts: required", _with(prompts=None)),
    ("prompts.0: must be at most 10000 characters", _with(prompts=["x" * 10_001])),
    ("prompts: Input should be a valid list", _with(prompts="a red circle")),
    ("prompts.0: <hypernet:x:0.8>: the farm applies LoRA (<lora:...>) only", _with(prompts=["a <hypernet:x:0.8> cat"])),
    ("prompts.0: <lora:x:strong>: a LoRA weight must be a number", _with(prompts=["a <lora:x:strong> cat"])),
    ("negative_prompt: <lora:x:1>: a LoRA applies from the prompt, not the negative prompt",
     _with(negative_prompt="<lora:x:1> blurry")),
    ("negative_prompt: the emphasis weight '1.2.3' is not a number", _with(negative_prompt="(blurry:1.2.3)")),
    ("seeds.0: must be -1 (random) or 0-4294967294, got -5", _with(seeds=[-5])),
    ("seeds.count: must be 1-10000000, got 0", _with(seeds={"start": 1, "count": 0})),
    ("seeds.stop: unknown key", _with(seeds={"start": 1, "count": 2, "stop": 3})),
    ("seeds: must list at least one seed", _with(seeds=[])),
    ("sampler: unknown sampler 'Euler z'; accepted: DPM++ 2M", _with(sampler="Euler z")),
    ("sampler: 'DPM++ 2S a' is not supported", _with(sampler="DPM++ 2S a")),
    ("sampler: Euler a ignores the Karras schedule", _with(schedule_type="Karras")),
    ("schedule_type: unknown schedule type 'Polyexponential'", _with(schedule_type="Polyexponential")),
    ("grid.steps[1]: must be 1-150, got 0", _with(grid={"steps": [10, 0]})),
    ("grid.seed: unknown axis", _with(grid={"seed": [1, 2]})),
    ("grid.prompt_sr: the first value 'green' is what each prompt's text is searched for, and it is neither in "
     "prompts.0, prompts.1 nor", _with(grid={"prompt_sr": ["green", "red"]})),
    ("grid.prompt_sr[1]: must be at most 10000 characters", _with(grid={"prompt_sr": ["red", "x" * 10_001]})),
    ("grid.cfg_scale: must list at least one value", _with(grid={"cfg_scale": []})),
    ("grid.width[0]: must be a multiple of 8", _with(grid={"width": [65]})),
    ("model: no built-in model or local path '/no/such/model'", _with(model="/no/such/model")),
    ("mode: Input should be 'txt2img'", _with(mode="outpaint")),
    ("name: must be 1-64 letters", _with(name="../../etc")),
    ("batch_size: must be 1-64, got 0", _with(batch_size=0)),
    ("grid: the job expands to", _with(seeds={"start": 0, "count": 10_000_000}, grid={"steps": [1, 2]})),
]


@pytest.mark.parametrize("expected, data", BAD, ids=[e.split(":")[0] + "-" + str(i) for i, (e, _) in enumerate(BAD)])
def test_bad_spec_is_rejected_naming_the_field_and_reason(expected, data):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert expected in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as info:
        parse_spec(_with(steps=0, width=100, bogus=True))
    fields = {field for field, _ in info.value.problems}
    assert {"steps", "width", "bogus"} <= fields


@pytest.mark.parametrize("text, reason", [
    ("prompts = [", "spec: is not valid TOML"),
    ("a = 1\na = 2", "spec: is not valid TOML"),
    ("[" * 100_000, "spec: is not valid TOML"),
])
def test_undecodable_spec_files(tmp_path, text, reason):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=reason):
        load_spec(path)


def test_binary_spec_file_is_rejected(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="spec: is not UTF-8"):
        load_spec(path)


def test_missing_prompts_file_names_the_field(tmp_path):
    (tmp_path / "job.toml").write_text('prompts_file = "nope.txt"\n')
    with pytest.raises(SpecError, match="prompts_file: no such file"):
        load_spec(tmp_path / "job.toml")


# --- img2img and inpaint -------------------------------------------------------------------------

@pytest.fixture
def picture_dir(tmp_path):
    from PIL import Image

    Image.new("RGB", (96, 64), "red").save(tmp_path / "init.png")
    Image.new("L", (96, 64), 255).save(tmp_path / "mask.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "small-mask.png")
    (tmp_path / "notes.png").write_bytes(b"this is not a picture")
    return tmp_path


IMAGE_BAD = [
    ("init_image: required for mode = 'img2img'", {"mode": "img2img"}),
    ("mask: required for mode = \"inpaint\"", {"mode": "inpaint", "init_image": "init.png"}),
    ("mask: only for mode = \"inpaint\"", {"mode": "img2img", "init_image": "init.png", "mask": "mask.png"}),
    ("init_image: only for mode = \"img2img\" or \"inpaint\"", {"init_image": "init.png"}),
    ("denoising_strength: only for mode", {"denoising_strength": 0.5}),
    ("init_image: no such file", {"mode": "img2img", "init_image": "missing.png"}),
    ("init_image: notes.png is not a readable image", {"mode": "img2img", "init_image": "notes.png"}),
    ("init_image[1]: no such file", {"mode": "img2img", "init_image": ["init.png", "gone.png"]}),
    ("mask: is 64x64 but init image init.png is 96x64", {"mode": "inpaint", "init_image": "init.png",
                                                         "mask": "small-mask.png"}),
    ("denoising_strength: must be 0-1, got 1.5", {"mode": "img2img", "init_image": "init.png",
                                                  "denoising_strength": 1.5}),
    ("denoising_strength: must be above 0 with fix_steps", {"mode": "img2img", "init_image": "init.png",
                                                            "denoising_strength": 0.0, "fix_steps": True}),
    ("resize_mode: latent upscale is supported for mode = \"img2img\" only", {
        "mode": "inpaint", "init_image": "init.png", "mask": "mask.png", "resize_mode": 3}),
    ("resize_mode: must be 0-3", {"mode": "img2img", "init_image": "init.png", "resize_mode": 4}),
    ("masked_content: Input should be 'fill', 'original', 'latent noise' or 'latent nothing'",
     {"mode": "inpaint", "init_image": "init.png", "mask": "mask.png", "masked_content": "noise"}),
    ("model: evil.ckpt is a pickle checkpoint", {"model": "evil.ckpt"}),
    ("model: tiny-sd-inpaint is an inpainting model", {"model": "tiny-sd-inpaint"}),
    ("hires.scale: 1024x1024 scaled by 4 is 4096x4096", {"width": 1024, "height": 1024, "hires": {"scale": 4.0}}),
    ("hires: supported for mode = \"txt2img\" only", {"mode": "img2img", "init_image": "init.png",
                                                      "hires": {"scale": 2}}),
    ("hires.upscaler: Input should be 'Latent'", {"hires": {"upscaler": "ESRGAN_4x"}}),
    ("vae: no local path 'no-vae'", {"vae": "no-vae"}),
    ("grid.masked_content[0]: Input should be", {"mode": "inpaint", "init_image": "init.png", "mask": "mask.png",
                                                 "grid": {"masked_content": ["latent"]}}),
]


@pytest.mark.parametrize("expected, data", IMAGE_BAD, ids=[e.split(":")[0] + "-" + str(i) for i, (e, _) in enumerate(IMAGE_BAD)])
def test_bad_image_specs_are_rejected_naming_the_field(picture_dir, expected, data):
    with pytest.raises(SpecError) as info:
        parse_spec({"prompts": ["x"], "width": 64, "height": 64, **data}, base_dir=picture_dir)
    assert expected in str(info.value)


def test_image_spec_paths_are_resolved_and_the_json_form_parses_back(picture_dir):
    spec = parse_spec({"prompts": ["x"], "mode": "inpaint", "init_image": ["init.png", "init.png"],
                       "mask": "mask.png", "resize_mode": "crop and resize",
                       "grid": {"masked_content": ["fill", "latent nothing"]}}, base_dir=picture_dir)
    assert spec.init_image == [str(picture_dir / "init.png")] * 2 and spec.resize_mode == 1
    assert spec.item_count == 1 * 2 * 2
    assert parse_spec(spec.to_json_dict()) == spec
    txt = parse_spec({"prompts": ["x"]})
    assert "denoising_strength" not in txt.to_json_dict() and parse_spec(txt.to_json_dict()) == txt
