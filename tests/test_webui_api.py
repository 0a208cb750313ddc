"""The webui's `/sdapi/v1` over the pool: requests translated as the webui means them (seeds,
batches, variation seeds, inpaint fields), fields the farm does not implement refused by name,
and a real worker answering txt2img and img2img with the webui's own response."""

from __future__ import annotations


import pytest
from PIL import Image

from dispatcher import webui
from farm import infotext, keys
from farm.errors import SpecError
from farm.spec import parse_spec
from farm.tokens import TokenBook
from tests.conftest import farm_serve

#: What a generated webui client sends: every field, most at the webui's defaults.
CLIENT_BODY = {
    "prompt": "a red circle", "negative_prompt": "", "styles": [], "seed": 5, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler", "scheduler": "automatic",
    "batch_size": 2, "n_iter": 2, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "restore_faces": False,
    "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False, "eta": None,
    "denoising_strength": None, "s_min_uncond": 0, "s_churn": 0, "s_tmax": None, "s_tmin": 0, "s_noise": 1,
    "override_settings": {"sd_model_checkpoint": "shapes-sd"}, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False, "comments": {},
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_prompt": "", "hr_negative_prompt": "",
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}


def spec_of(body: dict, mode: str = "txt2img"):
    return parse_spec(webui.job_spec(webui.request_fields(body, mode), mode, model="tiny-sd"))


def test_a_full_client_body_at_the_defaults_is_taken_and_keeps_the_webuis_seeds_and_batches():
    spec = spec_of(CLIENT_BODY)
    assert (spec.model, spec.lane, spec.batch_size, spec.item_count) == ("shapes-sd", "interactive", 2, 4)
    assert [spec.seeds.start + i for i in range(spec.seeds.count)] == [5, 6, 7, 8]
    assert (spec.sampler, spec.schedule_type, spec.emphasis) == ("Euler", "Automatic", "Original")
    assert spec_of({**CLIENT_BODY, "override_settings": {"emphasis": "No norm"}}).emphasis == "No norm"
    varied = spec_of({**CLIENT_BODY, "subseed": 40, "subseed_strength": 0.3})
    assert varied.seeds == [5] and varied.grid == {"variation_seed": [40, 41, 42, 43]}
    assert varied.variation_strength == 0.3
    hires = spec_of({**CLIENT_BODY, "enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 3})
    assert (hires.hires.scale, hires.hires.upscaler, hires.hires.steps, hires.hires.denoising_strength) == \
        (1.5, "Latent", 3, 0.7)


def test_the_values_other_clients_send_for_the_webuis_own_defaults_are_taken():
    # webuiapi sends eta=1.0 (eta_ancestral), s_tmax=0 (no limit) and image_cfg_scale=1.5 always.
    spec = spec_of({**CLIENT_BODY, "eta": 1.0, "s_tmax": 0, "image_cfg_scale": 1.5, "initial_noise_multiplier": 1})
    assert spec.sampler == "Euler"
    assert spec_of({**CLIENT_BODY, "sampler_name": "DDIM", "eta": 0}).sampler == "DDIM"


def test_inpaint_fields_mean_what_they_mean_in_the_webui():
    fields = webui.request_fields({"prompt": "x", "init_images": ["store:a.png"], "mask": "store:m.png",
                                   "inpainting_fill": 2, "inpaint_full_res": False, "inpainting_mask_invert": 1,
                                   "mask_blur": 8}, "img2img")
    spec = webui.job_spec(fields, "img2img", model="tiny-sd-inpaint")
    assert (spec["mode"], spec["masked_content"], spec["inpaint_area"], spec["invert_mask"], spec["mask_blur"],
            spec["denoising_strength"]) == ("inpaint", "latent noise", "whole", True, 8, 0.75)
    assert webui.job_spec(webui.request_fields({"init_images": ["store:a.png"]}, "img2img"), "img2img",
                          model="m")["mode"] == "img2img"


@pytest.mark.parametrize("changes, field", [
    ({"restore_faces": True}, "restore_faces"),
    ({"styles": ["cinematic"]}, "styles"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"override_settings": {"sd_vae": "kl-f8"}}, "override_settings.sd_vae"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"init_images": ["store:a.png"]}, "init_images"),
    ({"n_iter": 0}, "n_iter"),
    ({"eta": 0.5}, "eta"),
    ({"sampler_name": "DDIM", "eta": 1.0}, "eta"),
])
def test_a_field_the_farm_does_not_implement_is_refused_by_name(changes, field):
    with pytest.raises(SpecError) as refused:
        spec_of({**CLIENT_BODY, **changes})
    assert field in [f for f, _ in refused.value.problems]


@pytest.mark.parametrize("changes, field", [
    ({"steps": 0}, "steps"), ({"sampler_name": "Euler z"}, "sampler_name"), ({"hr_upscaler": "ESRGAN_4x",
                                                                            "enable_hr": True}, "hr_upscaler"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 20}}, "override_settings.CLIP_stop_at_last_layers"),
])
def test_spec_problems_are_named_by_the_webuis_fields(changes, field):
    with pytest.raises(SpecError) as refused:
        spec_of({**CLIENT_BODY, **changes})
    assert field in [f for f, _ in webui.webui_problems(refused.value).problems]


@pytest.mark.e2e
def test_a_webui_client_from_pypi_gets_the_webuis_answer_from_the_pool(farm_settings, workers_factory, s3_env,
                                                                         redis_client):
    """`webuiapi` (the client most webui scripts use) against `farm serve`, with its own defaults
    for every field and HTTP Basic as with the webui's --api-auth."""
    import httpx
    import webuiapi

    workers_factory(farm_settings).start(1)
    token = TokenBook(redis_client).create("ann")
    with farm_serve({**s3_env, **farm_settings.to_env()}) as url:
        refused = httpx.post(url + "/sdapi/v1/txt2img", json={**CLIENT_BODY, "tiling": True}, auth=("ann", token))
        assert refused.status_code == 422 and refused.json()["detail"][0]["field"] == "tiling"
        assert not redis_client.exists(keys.JOBS_INDEX)

        client = webuiapi.WebUIApi(baseurl=url + "/sdapi/v1", sampler="Euler", steps=2, username="ann",
                                   password=token)
        client.util_set_model("shapes-sd")
        assert client.util_get_current_model() == "shapes-sd"
        assert "Euler a" in client.util_get_sampler_names() and "karras" in client.util_get_scheduler_names()
        result = client.txt2img(prompt="a red circle", seed=5, batch_size=2, n_iter=2, width=64, height=64)
        info = result.info
        assert info["all_seeds"] == [5, 6, 7, 8] and info["seed"] == 5
        assert info["all_prompts"] == ["a red circle"] * 4 and info["sampler_name"] == "Euler"
        assert info["sd_model_name"] == "shapes-sd" and result.parameters["n_iter"] == 2
        assert [image.size for image in result.images] == [(64, 64)] * 4
        assert info["infotexts"] == [image.info["parameters"] for image in result.images]
        assert [infotext.parse(t)["Seed"] for t in info["infotexts"]] == ["5", "6", "7", "8"]
        assert len({image.tobytes() for image in result.images}) == 4
        header = httpx.get(f"{url}/v1/jobs/{info['farm_job']}", auth=("ann", token)).json()
        assert (header["lane"], header["total"], header["state"]) == ("interactive", 4, "done")

        read = client.png_info(result.images[2])
        assert read.info == info["infotexts"][2] and read.parameters["Seed"] == "7"
        assert client.get_progress()["state"]["job"] == ""

        again = client.img2img(images=[Image.new("RGB", (64, 64), "red")], prompt="a blue square",
                               denoising_strength=0.6, seed=9, steps=4, width=64, height=64)
        assert again.info["all_seeds"] == [9] and again.info["denoising_strength"] == 0.6
        assert infotext.parse(again.info["infotexts"][0])["Denoising strength"] == "0.6"
        with pytest.raises(RuntimeError, match="eta"):
            client.txt2img(prompt="x", sampler_name="DDIM", steps=2, width=64, height=64)  # its eta=1.0
