"""End to end, as a team runs it: real Redis, SeaweedFS S3, two Celery worker processes, the farm CLI."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from PIL import Image

from farm import infotext, keys, png
from farm.jobs import JobBoard
from tests.conftest import run_farm
from tests.test_spec import BAD

pytestmark = pytest.mark.e2e

SWEEP = """
model = "tiny-sd"
prompts = ["a red circle", "a blue square"]
seeds = { start = 1, count = 3 }
steps = 8
sampler = "Euler a"
width = 64
height = 64
batch_size = 2

[grid]
cfg_scale = [4.0, 7.0]
"""


def _env(settings, s3_env):
    return {**s3_env, **settings.to_env()}


def _objects(s3_server, bucket, prefix):
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def _submit_and_wait(spec_path, env):
    result = run_farm("submit", str(spec_path), "--wait", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[0]


def test_sweep_renders_every_image_into_s3_and_reruns_bit_identically(
        pool_settings, workers_factory, s3_server, bucket, s3_env, tmp_path, redis_client):
    workers_factory(pool_settings).start(2)
    spec_path = tmp_path / "sweep.toml"
    spec_path.write_text(SWEEP)
    env = _env(pool_settings, s3_env)

    job = _submit_and_wait(spec_path, env)

    objects = _objects(s3_server, bucket, f"renders/{job}/images/")
    assert len(objects) == 12
    client = s3_server.client()
    manifest = [json.loads(line) for line in
                client.get_object(Bucket=bucket, Key=f"renders/{job}/manifest.jsonl")["Body"].read().splitlines()]
    assert [row["index"] for row in manifest] == list(range(12))
    expected = [(cfg, prompt, seed) for cfg in (4.0, 7.0) for prompt in ("a red circle", "a blue square")
                for seed in (1, 2, 3)]
    for row, (cfg, prompt, seed) in zip(manifest, expected):
        data = client.get_object(Bucket=bucket, Key=f"renders/{row['key']}")["Body"].read()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert row["key"] == f"{job}/images/{row['index']:06d}-{seed}.png"
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        params = infotext.parse(png.read_parameters(data))
        assert (params["Prompt"], params["Seed"], params["CFG scale"]) == (prompt, str(seed), f"{cfg:g}")
        assert (params["Steps"], params["Sampler"], params["Size-1"], params["Model"]) == ("8", "Euler a", "64", "tiny-sd")
        assert params["Model hash"] == row["model_hash"] and len(row["model_hash"]) == 10
        for field in ("prompt", "negative_prompt", "seed", "sampler", "schedule_type", "steps", "cfg_scale",
                      "width", "height", "model", "mode", "worker", "device", "seconds"):
            assert field in row
    job_json = json.loads(client.get_object(Bucket=bucket, Key=f"renders/{job}/job.json")["Body"].read())
    assert job_json["spec"]["seeds"] == {"start": 1, "count": 3} and job_json["items"] == 12

    status = run_farm("status", job, "--json", env=env)
    assert status.returncode == 0
    assert json.loads(status.stdout)["state"] == "done" and json.loads(status.stdout)["done"] == 12

    rerun = _submit_and_wait(spec_path, env)
    assert rerun != job
    for row in manifest:
        first = client.get_object(Bucket=bucket, Key=f"renders/{row['key']}")["Body"].read()
        again = client.get_object(Bucket=bucket, Key=f"renders/{row['key'].replace(job, rerun)}")["Body"].read()
        assert first == again, f"item {row['index']} differs between runs"

    download = run_farm("results", job, "--out", str(tmp_path / "dl"), env=env)
    assert download.returncode == 0, download.stderr
    assert len(list((tmp_path / "dl" / job / "images").glob("*.png"))) == 12
    assert (tmp_path / "dl" / job / "manifest.jsonl").read_text().count("\n") == 12
    assert Image.open(tmp_path / "dl" / job / "grid.png").size[0] >= 3 * 64
    if not pool_settings.broker_is_redis:  # the queues were RabbitMQ's; the job state is in Redis
        assert not redis_client.keys(f"{pool_settings.queue}*") and redis_client.exists(keys.job_hash(job))


def test_item_already_stored_is_skipped_not_rendered_again(farm_settings, workers_factory, tmp_path, s3_env, s3_server, bucket):
    [worker] = workers_factory(farm_settings).start(1)
    spec_path = tmp_path / "one.toml"
    spec_path.write_text('prompts = ["x"]\nseeds = [7, 8]\nsteps = 4\nwidth = 64\nheight = 64\n')
    from farm import keys
    from farm.celery_app import make_celery
    from farm.message import RenderMessage
    from farm.plan import Plan
    from farm.spec import load_spec

    job = _submit_and_wait(spec_path, _env(farm_settings, s3_env))
    key = f"renders/{job}/images/000000-7.png"
    before = s3_server.client().head_object(Bucket=bucket, Key=key)["LastModified"]
    # Deliver the same chunk again, as a redelivery would while the job still runs (a worker
    # died after storing, before its ack). A finished job's chunks are dropped unopened.
    board = JobBoard.from_url(farm_settings.broker_url)
    board.redis.hset(keys.job_hash(job), "state", "running")
    plan = Plan(load_spec(spec_path), job)
    make_celery(farm_settings).send_task(keys.RENDER_TASK, kwargs=RenderMessage(plan.chunk(0), f"s3://{bucket}/renders").to_kwargs(),
                                         queue=keys.worker_queue(farm_settings.queue, worker))
    from farm.embedded import wait_until
    wait_until(lambda: board.deliveries(job).get(0) == 2 and not board.status(job).running, 60, "the redelivery")
    assert s3_server.client().head_object(Bucket=bucket, Key=key)["LastModified"] == before
    assert len(_objects(s3_server, bucket, f"renders/{job}/images/")) == 2
    assert RenderMessage(plan.chunk(0), "s").to_kwargs()["items"][0]["seed"] == 7


@pytest.mark.parametrize("expected, data", BAD, ids=[e.split(":")[0] + "-" + str(i) for i, (e, _) in enumerate(BAD)])
def test_bad_spec_is_refused_before_anything_is_queued(farm_settings, s3_env, tmp_path, redis_client, s3_server,
                                                       bucket, expected, data, monkeypatch):
    from typer.testing import CliRunner

    from farm.cli import app

    spec_path = tmp_path / "bad.json"
    spec_path.write_text(json.dumps(data))
    for name, value in _env(farm_settings, s3_env).items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["submit", str(spec_path)])
    assert result.exit_code == 2
    assert expected in " ".join(result.output.split())
    assert redis_client.llen(farm_settings.queue) == 0
    assert redis_client.keys(keys.job_hash("") + "*") == [] and not redis_client.exists(keys.JOBS_INDEX)
    assert _objects(s3_server, bucket, "") == {}
