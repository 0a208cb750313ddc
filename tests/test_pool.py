"""The shared pool with real worker processes, a real dispatcher process, Redis and SeaweedFS S3:
fair share, cancel, pause/resume, rebuild after a total crash, model affinity, live progress.
(Out-of-memory halving and SIGTERM are in the fault suite.) Counts and states are asserted,
never seconds."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from dispatcher.submit import submit
from farm.embedded import wait_until
from farm.jobs import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import run_farm, wait_job

pytestmark = pytest.mark.e2e


def spec(items: int, size: int = 64, steps: int = 4, batch: int = 4, **extra):
    return parse_spec({"prompts": ["p"], "seeds": {"start": 1, "count": items}, "width": size, "height": size,
                       "steps": steps, "batch_size": batch, **extra})


def cli_env(settings, s3_env) -> dict:
    return {**s3_env, **settings.to_env()}


def images(s3_server, bucket, job) -> dict[str, object]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"renders/{job}/images/")
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}


def workers_json(env) -> dict:
    result = run_farm("workers", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_small_job_of_a_second_user_finishes_before_a_tenth_of_a_big_one(farm_settings, workers_factory, s3_env):
    workers_factory(farm_settings).start(1)
    board = JobBoard.from_url(farm_settings.broker_url)
    big = submit(spec(2000), farm_settings, user="ann").job_id
    wait_until(lambda: board.status(big).done > 0, 120, "the big job to start")
    time.sleep(5)
    small = submit(spec(50), farm_settings, user="bob").job_id
    assert wait_job(board, small).state is JobState.DONE
    done_then = board.status(big).done
    assert done_then < 200, f"ann had {done_then} of 2000 done when bob's 50 finished"

    result = run_farm("cancel", big, env=cli_env(farm_settings, s3_env))
    assert result.returncode == 0, result.stderr
    assert board.status(big).state is JobState.CANCELLED


def test_cancel_stops_the_running_chunk_at_its_next_step_and_keeps_what_is_stored(
        pool_settings, workers_factory, s3_env, s3_server, bucket):
    [name] = workers_factory(pool_settings).start(1)
    env = cli_env(pool_settings, s3_env)
    board = JobBoard.from_url(pool_settings.require_state())
    job = submit(spec(6, size=256, steps=150, batch=2), pool_settings).job_id

    def rendering():
        current = next(w for w in workers_json(env)["workers"] if w["worker"] == name)["current"]
        return current if current and current["step"] >= 2 else None

    wait_until(rendering, 180, "the worker to be a few steps into the first chunk", interval=0.5)
    current = rendering()
    assert current["job"] == job and current["steps"] == 150
    status = json.loads(run_farm("status", job, "--json", env=env).stdout)
    assert status["state"] == "running" and 0 < status["progress"] < 1 and status["workers"] == [name]

    result = run_farm("cancel", job, env=env)
    assert result.returncode == 0 and "cancelled" in result.stdout
    # Stopped mid-chunk: nothing runs any more, the chunk was not finished, and nothing new started.
    wait_until(lambda: not board.status(job).running and rendering() is None, 30, "the chunk to stop", interval=0.5)
    time.sleep(2)
    assert board.status(job).state is JobState.CANCELLED
    assert board.status(job).done == 0 and images(s3_server, bucket, job) == {}
    assert board.deliveries(job) == {current["chunk"]: 1}
    assert run_farm("cancel", job, env=env).returncode == 2  # already cancelled: refused, named


def test_pause_holds_a_job_and_resume_finishes_it_each_image_once(
        pool_settings, workers_factory, s3_env, s3_server, bucket):
    workers = workers_factory(pool_settings)
    workers.start(1)
    env = cli_env(pool_settings, s3_env)
    board = JobBoard.from_url(pool_settings.require_state())
    job = submit(spec(24, steps=6, batch=2), pool_settings).job_id
    wait_until(lambda: board.status(job).done >= 4, 120, "a few images")
    assert run_farm("pause", job, env=env).returncode == 0
    wait_until(lambda: not board.status(job).running, 60, "the running chunk to finish")
    held = board.status(job).done
    time.sleep(3)
    assert board.status(job).done == held < 24
    assert board.status(job).state is JobState.PAUSED

    # The dispatcher dies while the job is paused; a new one carries on from Redis.
    workers.kill_dispatcher()
    workers.start_dispatcher()
    result = run_farm("resume", job, env=env)
    assert result.returncode == 0 and "resumed" in result.stdout
    watched = run_farm("status", job, "--watch", env=env)
    assert watched.returncode == 0, watched.stderr
    assert "ETA" in watched.stderr and "done" in watched.stdout
    assert board.status(job).state is JobState.DONE
    assert len(images(s3_server, bucket, job)) == 24
    assert set(board.deliveries(job).values()) == {1}


def test_resume_rebuilds_a_job_after_every_process_and_redis_are_lost(
        farm_settings, workers_factory, s3_env, s3_server, bucket, redis_client):
    workers = workers_factory(farm_settings)
    names = workers.start(2)
    env = cli_env(farm_settings, s3_env)
    board = JobBoard.from_url(farm_settings.broker_url)
    job = submit(spec(16, size=128, steps=10, batch=2), farm_settings).job_id
    wait_until(lambda: board.status(job).done >= 4, 180, "a few images")
    for name in names:
        workers.kill(name)
    workers.kill_dispatcher()
    redis_client.flushall()
    records = {o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=bucket, Prefix=f"renders/{job}/records/").get("Contents", [])}
    before = {k: v for k, v in images(s3_server, bucket, job).items()
              if f"renders/{job}/records/{k.rsplit('/', 1)[1][:6]}.json" in records}
    assert 4 <= len(before) < 16

    workers.start(2)
    result = run_farm("resume", job, env=env)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} of 16 images already there" in result.stdout
    assert wait_job(board, job).state is JobState.DONE
    after = images(s3_server, bucket, job)
    assert len(after) == 16
    assert all(after[k] == v for k, v in before.items()), "a stored image was rendered again"


def test_three_models_on_two_workers_are_loaded_at_most_four_times(
        farm_settings, workers_factory, s3_env, cache_dir, tmp_path):
    from workers.tiny import builtin_model_dir

    source = builtin_model_dir("tiny-sd", cache_dir)
    models = [str(shutil.copytree(source, tmp_path / name)) for name in ("alpha", "beta", "gamma")]
    workers_factory(farm_settings).start(2)
    board = JobBoard.from_url(farm_settings.broker_url)
    job = submit(spec(20, steps=2, batch=2, grid={"model": models}), farm_settings).job_id
    status = wait_job(board, job)
    assert status.state is JobState.DONE and status.done == 60
    pool = workers_json(cli_env(farm_settings, s3_env))
    assert 3 <= pool["model_loads"] <= 4
    assert sum(w["images"] for w in pool["workers"]) == 60


def test_workers_table_shows_host_gpu_model_and_pace(farm_settings, workers_factory, s3_env):
    [name] = workers_factory(farm_settings).start(1)
    board = JobBoard.from_url(farm_settings.broker_url)
    assert wait_job(board, submit(spec(8), farm_settings).job_id).state is JobState.DONE
    env = cli_env(farm_settings, s3_env)
    [row] = workers_json(env)["workers"]
    assert row["worker"] == name and row["gpu"] == "none" and row["device"].startswith("cpu")
    assert row["models"] == ["tiny-sd"] and row["model_loads"] == 1 and row["images"] == 8
    assert row["images_per_minute"] > 0 and row["heartbeat_seconds_ago"] < 30 and row["current"] is None
    table = run_farm("workers", env=env)
    assert table.returncode == 0 and name in table.stdout and "tiny-sd" in table.stdout


def test_an_interactive_job_overtakes_a_batch_job_and_priority_orders_a_lane(pool_settings, workers_factory):
    workers_factory(pool_settings).start(1)
    board = JobBoard.from_url(pool_settings.require_state())
    sweep = submit(spec(400), pool_settings, user="ann").job_id
    wait_until(lambda: board.status(sweep).done > 0, 120, "the sweep to start")
    quick = submit(spec(8), pool_settings, user="ann", lane="interactive").job_id
    urgent = submit(spec(8), pool_settings, user="ann", priority=1).job_id
    assert wait_job(board, quick).state is JobState.DONE
    assert board.status(urgent).done < 8, "the interactive job went first"
    assert wait_job(board, urgent).state is JobState.DONE
    assert board.status(sweep).done < 100, "the urgent job overtook the sweep"
    assert board.status(quick).completed < board.status(urgent).completed


def test_a_million_item_job_is_accepted_and_fed_a_few_chunks_at_a_time(farm_settings, workers_factory, s3_env,
                                                                       tmp_path):
    workers_factory(farm_settings).start(1)
    env = cli_env(farm_settings, s3_env)
    path = tmp_path / "million.json"
    path.write_text(json.dumps({"prompts": [f"variant {i}" for i in range(1000)], "seeds": {"start": 0, "count": 1000},
                                "width": 64, "height": 64, "steps": 2, "batch_size": 8}))
    result = run_farm("submit", str(path), env=env)
    assert result.returncode == 0, result.stderr
    job = result.stdout.split()[0]
    board = JobBoard.from_url(farm_settings.broker_url)
    wait_until(lambda: board.status(job).done >= 16, 120, "the first images")
    status = board.status(job)
    assert status.total == 1_000_000 and status.state is JobState.RUNNING
    assert sum(board.redis.llen(k) for k in board.redis.keys(f"{farm_settings.queue}.*")) <= 2
    assert board.redis.info("memory")["used_memory"] < 50 * 2**20
    assert run_farm("cancel", job, env=env).returncode == 0
