"""img2img, inpaint and reproduction through the real farm: Redis, SeaweedFS S3, a worker process."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from dispatcher.submit import submit
from farm import infotext, png
from farm.jobs import JobBoard, JobState
from farm.spec import load_spec, parse_spec
from tests.conftest import run_farm, wait_job

pytestmark = pytest.mark.e2e


@pytest.fixture
def pictures(tmp_path):
    init = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(init).ellipse((12, 12, 52, 52), fill="red")
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((20, 20, 44, 44), fill=255)
    mask.save(tmp_path / "mask.png")
    return tmp_path


def _get(s3_server, bucket, key) -> bytes:
    return s3_server.client().get_object(Bucket=bucket, Key=f"renders/{key}")["Body"].read()


def test_img2img_and_inpaint_jobs_through_the_farm(farm_settings, workers_factory, s3_server, bucket, pictures):
    workers_factory(farm_settings).start(1)
    board = JobBoard.from_url(farm_settings.broker_url)
    img2img = parse_spec({"mode": "img2img", "prompts": ["a blue circle"], "init_image": "init.png",
                          "denoising_strength": 0.5, "seeds": [1, 2], "steps": 8, "width": 64, "height": 64},
                         base_dir=pictures)
    inpaint = parse_spec({"mode": "inpaint", "prompts": ["a blue square"], "init_image": "init.png",
                          "mask": "mask.png", "seeds": [3], "steps": 8, "width": 64, "height": 64,
                          "grid": {"masked_content": ["fill", "latent nothing"]}}, base_dir=pictures)
    jobs = [submit(img2img, farm_settings).job_id, submit(inpaint, farm_settings).job_id]
    for job in jobs:
        assert wait_job(board, job).state is JobState.DONE

    stored_inputs = [o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=bucket, Prefix=f"renders/{jobs[1]}/inputs/")["Contents"]]
    assert len(stored_inputs) == 2  # the init image and the mask, uploaded once each
    job_json = json.loads(_get(s3_server, bucket, f"{jobs[1]}/job.json"))
    assert job_json["spec"]["init_image"].startswith(f"store:{jobs[1]}/inputs/")

    params = infotext.parse(png.read_parameters(_get(s3_server, bucket, f"{jobs[0]}/images/000001-2.png")))
    assert params["Denoising strength"] == "0.5" and params["Seed"] == "2"

    original = np.asarray(Image.open(pictures / "init.png").convert("RGB"))
    outside = np.asarray(Image.open(pictures / "mask.png")) == 0
    outside[9:56, 9:56] = False  # leave out the blurred border: mask_blur 4 blurs 10 px out
    for index, content in enumerate(["fill", "latent nothing"]):
        data = _get(s3_server, bucket, f"{jobs[1]}/images/{index:06d}-3.png")
        out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert (out[outside] == original[outside]).all()
        assert infotext.parse(png.read_parameters(data))["Masked content"] == content


def test_a_corrupt_init_image_fails_its_items_with_the_reason(farm_settings, workers_factory, s3_server, bucket):
    workers_factory(farm_settings).start(1)
    s3_server.client().put_object(Bucket=bucket, Key="renders/uploads/broken.png", Body=b"\x89PNG garbage")
    spec = parse_spec({"mode": "img2img", "prompts": ["x"], "init_image": ["store:uploads/broken.png"],
                       "seeds": [1, 2], "steps": 4, "width": 64, "height": 64})
    job = submit(spec, farm_settings).job_id
    status = wait_job(JobBoard.from_url(farm_settings.broker_url), job)
    assert status.state is JobState.DONE_WITH_FAILURES
    assert set(status.failures) == {0, 1}
    assert "not a readable image" in status.failures[0]


def test_missing_store_key_is_refused_at_submission(farm_settings, redis_client):
    from farm.errors import SpecError

    spec = parse_spec({"mode": "img2img", "prompts": ["x"], "init_image": "store:uploads/nothing-here.png",
                       "width": 64, "height": 64})
    with pytest.raises(SpecError, match="init_image: no object 'uploads/nothing-here.png'"):
        submit(spec, farm_settings)
    assert redis_client.llen(farm_settings.queue) == 0


def test_submit_from_image_reproduces_it_bit_for_bit(farm_settings, workers_factory, s3_server, bucket, tmp_path, s3_env):
    workers_factory(farm_settings).start(1)
    # Emphasis, an emphasis mode, prompt editing and a LoRA must come back from the infotext too.
    (tmp_path / "job.toml").write_text('model = "shapes-sd"\n'
                                       'prompts = ["a (red:1.3) [circle:square:3], on white <lora:shapes-ring:0.7>"]\n'
                                       'negative_prompt = "[blurry]"\nemphasis = "No norm"\n'
                                       'seeds = [42]\nsteps = 6\nsampler = "DPM++ 2M Karras"\ncfg_scale = 5.5\n'
                                       'clip_skip = 2\nwidth = 64\nheight = 64\nbatch_size = 1\n')
    board = JobBoard.from_url(farm_settings.broker_url)
    first = submit(load_spec(tmp_path / "job.toml"), farm_settings).job_id
    wait_job(board, first)
    original = _get(s3_server, bucket, f"{first}/images/000000-42.png")
    (tmp_path / "made.png").write_bytes(original)

    env = {**s3_env, **farm_settings.to_env()}
    result = run_farm("submit", "--from-image", str(tmp_path / "made.png"), "--wait", env=env)
    assert result.returncode == 0, result.stderr
    again = _get(s3_server, bucket, f"{result.stdout.strip()}/images/000000-42.png")
    assert again == original
    parameters = png.read_parameters(original)
    assert "Emphasis: No norm" in parameters and 'Lora hashes: "shapes-ring: ' in parameters


def test_a_job_brings_its_own_lora_through_the_store(farm_settings, workers_factory, s3_server, bucket, tmp_path):
    import hashlib

    from farm import loras

    workers_factory(farm_settings).start(1)
    shipped = loras.find(None, "shapes-ring")
    (tmp_path / "mine.safetensors").write_bytes(shipped.read_bytes())
    spec = parse_spec({"model": "shapes-sd", "prompts": ["a red circle on a white background <lora:mine:1>",
                                                         "a red circle on a white background <lora:shapes-ring:1>"],
                       "loras": {"mine": "mine.safetensors"}, "seeds": [5], "steps": 8, "width": 64, "height": 64,
                       "batch_size": 1}, base_dir=tmp_path)
    board = JobBoard.from_url(farm_settings.broker_url)
    job = submit(spec, farm_settings).job_id
    assert wait_job(board, job).state is JobState.DONE
    key = json.loads(_get(s3_server, bucket, f"{job}/job.json"))["spec"]["loras"]["mine"]
    assert key.startswith(f"store:{job}/inputs/") and key.endswith(".safetensors")
    assert _get(s3_server, bucket, key.removeprefix("store:")) == shipped.read_bytes()
    theirs, ours = (_get(s3_server, bucket, f"{job}/images/{i:06d}-5.png") for i in (0, 1))
    assert Image.open(io.BytesIO(theirs)).tobytes() == Image.open(io.BytesIO(ours)).tobytes()
    digest = hashlib.sha256(shipped.read_bytes()).hexdigest()[:12]
    assert f'Lora hashes: "mine: {digest}"' in png.read_parameters(theirs)
