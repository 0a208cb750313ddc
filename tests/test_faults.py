"""Redelivery, both halves: a killed worker's chunk comes back fast; a long chunk is never delivered twice."""

from __future__ import annotations

import base64
import json
import time

import pytest

from dispatcher.submit import submit
from farm.embedded import wait_until
from farm.progress import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import wait_job

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def _queued_chunks(client, queue: str) -> set[int]:
    """Chunk numbers of the render messages waiting in any worker's queue, or handed back to their job."""
    chunks = {int(n) for key in client.keys("farm:job:*:retry") for n in client.lrange(key, 0, -1)}
    raws = [raw for key in client.keys(f"{queue}.*") for raw in client.lrange(key, 0, -1)]
    for raw in raws:
        message = json.loads(raw)
        body = base64.b64decode(message["body"]) if message["properties"].get("body_encoding") == "base64" \
            else message["body"].encode()
        _args, kwargs, _embed = json.loads(body)
        chunks.add(kwargs["chunk"])
    return chunks


def _images(s3_server, bucket, job):
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"renders/{job}/images/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_chunk_of_a_killed_worker_is_redelivered_within_30s(farm_settings, workers_factory, s3_server, bucket):
    assert farm_settings.visibility_timeout == 15  # the default a user gets
    workers = workers_factory(farm_settings)
    victim, _ = workers.start(2)
    spec = parse_spec({"prompts": ["a", "b"], "seeds": {"start": 1, "count": 3}, "grid": {"cfg_scale": [4.0, 7.0]},
                       "width": 128, "height": 128, "steps": 100, "batch_size": 2})
    job = submit(spec, farm_settings).job_id
    board = JobBoard.from_url(farm_settings.broker_url)

    def victim_chunk():
        for chunk, row in board.redis.hgetall(f"farm:job:{job}:running").items():
            if json.loads(row)["worker"] == victim:
                return int(chunk)
        return None

    held = []
    wait_until(lambda: held.append(victim_chunk()) or held[-1] is not None, 120, "the victim to take a chunk")
    chunk = held[-1]
    workers.kill(victim)
    killed_at = time.monotonic()
    # Back in play: handed back by the feeder once the worker misses its heartbeats, then
    # given to the other worker.
    wait_until(lambda: board.deliveries(job).get(chunk, 0) >= 2 or chunk in _queued_chunks(board.redis, farm_settings.queue),
               60, "the chunk to be redelivered", interval=0.2)
    assert time.monotonic() - killed_at < 30
    wait_until(lambda: board.deliveries(job).get(chunk, 0) >= 2, 240, "the chunk to run again", interval=0.5)

    status = wait_job(board, job)
    assert status.state is JobState.DONE and status.done == 12
    assert len(_images(s3_server, bucket, job)) == 12


def test_chunk_rendering_for_three_visibility_timeouts_runs_once(farm_settings, workers_factory, s3_server, bucket):
    settings = farm_settings.with_overrides(visibility_timeout=3.0)
    workers_factory(settings).start(2)
    spec = parse_spec({"prompts": ["slow"], "seeds": [1], "width": 256, "height": 256, "steps": 150})
    job = submit(spec, settings).job_id
    board = JobBoard.from_url(settings.broker_url)
    status = wait_job(board, job)
    wait_until(lambda: not board.status(job).running, 30, "the chunk to be released")
    record = json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"renders/{job}/records/000000.json")["Body"].read())
    assert record["seconds"] >= 3 * settings.visibility_timeout, "the chunk was too quick to test the lease"
    assert status.state is JobState.DONE
    # Let any wrongful redelivery surface: the other worker restores expired messages every second.
    time.sleep(2 * settings.visibility_timeout)
    assert board.deliveries(job) == {0: 1}
    assert not any(board.redis.llen(k) for k in board.redis.keys(f"{settings.queue}.*"))
    assert len(_images(s3_server, bucket, job)) == 1
