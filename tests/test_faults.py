"""Every fault a pool meets overnight, injected into a running farm (Redis with AOF, SeaweedFS S3,
real worker and dispatcher processes), each checked for its outcome: every item stored exactly
once or failed with its reason, and the job ended. `python -m bench.faults` runs this module and
prints the table that each test reports (set FARM_FAULT_REPORT to collect it yourself)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from dispatcher.submit import submit
from farm import keys
from farm.embedded import RedisServer, wait_until
from farm.jobs import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import S3_SECRET_KEY, broker_label, run_farm, wait_job
from tests.netfault import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def spec(items: int, size: int = 64, steps: int = 4, batch: int = 2, **extra):
    return parse_spec({"prompts": ["p"], "seeds": {"start": 1, "count": items}, "width": size, "height": size,
                       "steps": steps, "batch_size": batch, **extra})


@dataclass
class Tally:
    fault: str
    expected: int
    stored: int
    duplicates: int
    lost: int
    failed: int
    outcome: str
    redelivered: int


def tally(fault: str, s3_server, bucket: str, board: JobBoard, job: str, expected: int) -> Tally:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"renders/{job}/images/")
    names = [o["Key"].rsplit("/", 1)[1] for page in pages for o in page.get("Contents", [])]
    indexes = [int(n.split("-")[0]) for n in names]
    status = board.status(job)
    result = Tally(fault, expected, len(set(indexes)), len(indexes) - len(set(indexes)),
                   expected - len(set(indexes)) - status.failed, status.failed, status.state.value,
                   sum(1 for n in board.deliveries(job).values() if n > 1))
    _report(result)
    return result


def _report(row: Tally) -> None:
    """One row of bench/faults.py's table, when it asked for them."""
    if os.environ.get("FARM_FAULT_REPORT"):
        with open(os.environ["FARM_FAULT_REPORT"], "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")


def running_chunk_of(board: JobBoard, job: str, worker: str) -> int | None:
    for chunk, row in board.redis.hgetall(keys.running(job)).items():
        if json.loads(row)["worker"] == worker:
            return int(chunk)
    return None


def taken_chunk(board: JobBoard, job: str, worker: str) -> int:
    """The chunk the worker renders, once it has taken one."""
    # In a list: chunk 0 is a chunk too.
    return wait_until(lambda: (c := running_chunk_of(board, job, worker)) is not None and [c], 120,
                      f"{worker} to take a chunk")[0]


def test_chunk_of_a_killed_worker_is_redelivered_within_30s(pool_settings, workers_factory, s3_server, bucket):
    assert pool_settings.visibility_timeout == 15  # the default a user gets
    workers = workers_factory(pool_settings)
    victim, survivor = workers.start(2)
    job = submit(spec(8, size=128, steps=100), pool_settings).job_id
    board = JobBoard.from_url(pool_settings.require_state())
    chunk = taken_chunk(board, job, victim)
    workers.kill(victim)
    killed_at = time.monotonic()
    # Handed back by the dispatcher once the worker misses three heartbeats, then given to the other.
    wait_until(lambda: board.deliveries(job).get(chunk, 0) >= 2
               or str(chunk).encode() in board.redis.lrange(keys.handed_back(job), 0, -1)
               or board.redis.hexists(keys.worker_assigned(survivor), keys.assignment(job, chunk)),
               60, "the chunk to be handed back", interval=0.2)
    assert time.monotonic() - killed_at < 30
    wait_until(lambda: board.deliveries(job).get(chunk, 0) >= 2, 240, "the chunk to run again", interval=0.5)
    assert wait_job(board, job).state is JobState.DONE
    t = tally(f"{broker_label(pool_settings)}SIGKILL one worker mid-chunk", s3_server, bucket, board, job, 8)
    assert (t.stored, t.duplicates, t.lost) == (8, 0, 0)


def test_workers_killed_several_times_during_one_job(farm_settings, workers_factory, s3_server, bucket):
    settings = farm_settings.with_overrides(visibility_timeout=6.0)
    workers = workers_factory(settings)
    workers.start(2)
    job = submit(spec(24, size=128, steps=20), settings).job_id
    board = JobBoard.from_url(settings.broker_url)
    for _ in range(3):
        victims = []
        wait_until(lambda: victims.extend(w for w in list(workers.procs) if workers.procs[w].poll() is None
                                          and running_chunk_of(board, job, w) is not None) or victims, 120,
                   "a worker mid-chunk", interval=0.1)
        workers.kill(victims[0])
        workers.start(1)
    assert wait_job(board, job, timeout=400).state is JobState.DONE
    t = tally("SIGKILL a worker mid-chunk, 3 times in one job", s3_server, bucket, board, job, 24)
    assert (t.stored, t.duplicates, t.lost) == (24, 0, 0)


def test_sigterm_lets_a_worker_finish_its_chunk_and_hand_back_the_next(pool_settings, workers_factory, s3_server,
                                                                       bucket):
    workers = workers_factory(pool_settings)
    [name] = workers.start(1)
    board = JobBoard.from_url(pool_settings.require_state())
    job = submit(spec(4, size=128, steps=30), pool_settings).job_id
    wait_until(lambda: board.status(job).running, 120, "the first chunk to start")
    workers.terminate(name)
    assert board.status(job).done == 2
    assert board.redis.lrange(keys.handed_back(job), 0, -1) == [b"1"]
    workers.start(1)
    assert wait_job(board, job).state is JobState.DONE
    t = tally(f"{broker_label(pool_settings)}SIGTERM to a worker mid-chunk", s3_server, bucket, board, job, 4)
    assert (t.stored, t.duplicates, t.lost, t.redelivered) == (4, 0, 0, 0)


def test_redis_stopped_and_restarted_mid_job(farm_settings, workers_factory, s3_server, bucket, tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        settings = farm_settings.with_overrides(broker_url=server.url, visibility_timeout=6.0)
        workers_factory(settings).start(2)
        job = submit(spec(24, size=128, steps=10), settings).job_id
        board = JobBoard.from_url(settings.broker_url)
        wait_until(lambda: board.status(job).done >= 4 and board.status(job).running, 180, "items done and running")
        server.stop()  # SIGTERM: Redis writes its AOF and exits, with chunks queued and running
        time.sleep(5)
        server.start()
        assert wait_job(board, job, timeout=400).state is JobState.DONE
        t = tally("Redis stopped 5 s and restarted (AOF) mid-job", s3_server, bucket, board, job, 24)
        assert (t.stored, t.duplicates, t.lost) == (24, 0, 0)
    finally:
        server.stop()


def test_the_store_unreachable_for_30s_mid_job(farm_settings, workers_factory, s3_server, s3_env, bucket):
    proxy = TcpProxy(int(s3_server.endpoint.rsplit(":", 1)[1])).start()
    settings = farm_settings.with_overrides(s3_endpoint_url=proxy.url)
    workers = workers_factory(settings)
    workers.env["AWS_ENDPOINT_URL"] = proxy.url
    workers.start(1)
    board = JobBoard.from_url(settings.broker_url)
    job = submit(spec(16, steps=6), settings).job_id
    wait_until(lambda: board.status(job).done >= 2, 120, "the first images")
    proxy.cut()
    cut_at = time.monotonic()
    time.sleep(30)
    stalled = board.status(job)
    proxy.restore()
    assert stalled.state is JobState.RUNNING and stalled.failed == 0
    assert wait_job(board, job, timeout=400).state is JobState.DONE
    assert time.monotonic() - cut_at >= 30
    t = tally("the S3 server unreachable for 30 s mid-job", s3_server, bucket, board, job, 16)
    assert (t.stored, t.duplicates, t.lost, t.failed) == (16, 0, 0, 0)
    proxy.cut()


def test_wrong_storage_credentials_fail_at_submission(farm_settings, s3_env, tmp_path, redis_client, s3_server,
                                                      bucket):
    spec_path = tmp_path / "ok.toml"
    spec_path.write_text('prompts = ["x"]\nwidth = 64\nheight = 64\n')
    env = {**s3_env, **farm_settings.to_env(), "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY + "x"}
    result = run_farm("submit", str(spec_path), env=env)
    assert result.returncode == 3
    assert "refused access" in result.stderr
    assert S3_SECRET_KEY not in result.stderr + result.stdout
    assert redis_client.keys("farm:*") == [] and redis_client.keys(f"{farm_settings.queue}*") == []
    assert s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    _report(Tally("wrong storage credentials", 1, 0, 0, 0, 0, "refused at submission (exit 3), nothing queued", 0))


def test_out_of_memory_halves_the_batch_and_the_worker_remembers(farm_settings, workers_factory, s3_server, bucket,
                                                                 tmp_path):
    settings = farm_settings.with_overrides(inject_oom_above=2)
    workers_factory(settings).start(1)
    board = JobBoard.from_url(settings.broker_url)
    job = submit(spec(16, batch=8), settings).job_id
    assert wait_job(board, job).state is JobState.DONE
    rows = [json.loads(line) for line in s3_server.client().get_object(
        Bucket=bucket, Key=f"renders/{job}/manifest.jsonl")["Body"].read().splitlines()]
    assert all(len(r["rendered_with"]) == 2 and r["batch_size"] == 8 for r in rows)
    log = (tmp_path / "w0@test.log").read_text()
    # The first chunk learnt 8 -> 4 -> 2; the second started at 2.
    assert log.count("out of memory at batch 8") == 1 and log.count("out of memory at batch 4") == 1
    t = tally("out of memory on batches above 2 (of 8)", s3_server, bucket, board, job, 16)
    assert (t.stored, t.duplicates, t.lost) == (16, 0, 0)


def test_a_poison_item_among_fifty_good_ones(farm_settings, workers_factory, s3_server, bucket, tmp_path):
    from PIL import Image, ImageDraw

    for name, colour in (("good.png", "red"), ("bad.png", "blue")):
        picture = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(picture).ellipse((16, 16, 48, 48), fill=colour)
        picture.save(tmp_path / name)
    data = {"mode": "img2img", "prompts": ["p"], "seeds": [1], "width": 64, "height": 64, "steps": 4,
            "init_image": ["good.png"] * 25 + ["bad.png"] + ["good.png"] * 25}
    job = submit(parse_spec(data, base_dir=tmp_path), farm_settings).job_id
    # The input rots in the store after it was checked at submission.
    client = s3_server.client()
    inputs = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"renders/{job}/inputs/")["Contents"]]
    job_json = json.loads(client.get_object(Bucket=bucket, Key=f"renders/{job}/job.json")["Body"].read())
    bad_key = "renders/" + job_json["spec"]["init_image"][25].removeprefix("store:")
    assert bad_key in inputs
    client.put_object(Bucket=bucket, Key=bad_key, Body=b"\x89PNG\r\n\x1a\n then garbage")
    workers_factory(farm_settings).start(1)
    board = JobBoard.from_url(farm_settings.broker_url)
    status = wait_job(board, job)
    assert status.state is JobState.DONE_WITH_FAILURES
    assert list(status.failures) == [25] and "input image" in status.failures[25]
    t = tally("a poison item (corrupt init image) among 50 good", s3_server, bucket, board, job, 51)
    assert (t.stored, t.duplicates, t.lost, t.failed) == (50, 0, 0, 1)


def test_the_dispatcher_killed_again_and_again_while_feeding(pool_settings, workers_factory, s3_server, bucket):
    workers = workers_factory(pool_settings)
    workers.start(2)
    board = JobBoard.from_url(pool_settings.require_state())
    job = submit(spec(60, steps=3), pool_settings).job_id
    for _ in range(4):
        wait_until(lambda: board.status(job).done > 0 or board.status(job).running, 60, "progress")
        time.sleep(0.7)
        workers.kill_dispatcher()
        time.sleep(0.5)
        workers.start_dispatcher()
    assert wait_job(board, job, timeout=300).state is JobState.DONE
    t = tally(f"{broker_label(pool_settings)}the dispatcher SIGKILLed 4 times while feeding", s3_server, bucket,
              board, job, 60)
    assert (t.stored, t.duplicates, t.lost) == (60, 0, 0)


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB filesystem for the model cache (tmpfs; needs the right to mount, as CI's root has)."""
    path = tmp_path / "full"
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_model_cache_disk_fails_items_with_the_reason(farm_settings, workers_factory, s3_server, bucket,
                                                             full_disk):
    settings = farm_settings.with_overrides(cache_dir=full_disk)
    workers_factory(settings).start(1)
    board = JobBoard.from_url(settings.broker_url)
    job = submit(spec(4), settings).job_id
    status = wait_job(board, job)
    assert status.state is JobState.DONE_WITH_FAILURES and status.failed == 4
    reason = status.failures[0]
    assert re.search(r"no space left on device", reason, re.I) and str(full_disk) in reason
    t = tally("disk full on the worker's model cache", s3_server, bucket, board, job, 4)
    assert (t.stored, t.lost, t.failed) == (0, 0, 4)


def test_chunk_rendering_for_three_visibility_timeouts_runs_once(farm_settings, workers_factory, s3_server, bucket):
    settings = farm_settings.with_overrides(visibility_timeout=3.0)
    workers_factory(settings).start(2)
    job = submit(parse_spec({"prompts": ["slow"], "seeds": [1], "width": 256, "height": 256, "steps": 80}),
                 settings).job_id
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
    t = tally("one chunk rendering for 3x the visibility timeout", s3_server, bucket, board, job, 1)
    assert (t.stored, t.duplicates, t.redelivered) == (1, 0, 0)


def test_report_file_is_plain_json_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("FARM_FAULT_REPORT", str(tmp_path / "r.jsonl"))
    _report(Tally("x", 1, 1, 0, 0, 0, "done", 0))
    assert json.loads(Path(tmp_path / "r.jsonl").read_text())["outcome"] == "done"


def test_scale_in_drains_then_sigterm_with_a_short_grace_loses_nothing(pool_settings, workers_factory, s3_server,
                                                                       bucket):
    """As Kubernetes scales a worker Deployment in: the pod's preStop drains it, SIGTERM follows, and
    SIGKILL comes when the grace period (shorter than the chunk here) runs out."""
    from farm import pool

    settings = pool_settings.with_overrides(visibility_timeout=6.0)
    workers = workers_factory(settings)
    victim, survivor = workers.start(2)
    job = submit(spec(6, size=128, steps=100), settings).job_id
    board = JobBoard.from_url(settings.require_state())
    chunk = taken_chunk(board, job, victim)
    pool.drain(board.redis, [victim])
    workers.procs[victim].send_signal(signal.SIGTERM)
    time.sleep(2)  # the grace period, shorter than the chunk
    assert running_chunk_of(board, job, victim) == chunk  # still rendering when the grace ends
    workers.kill(victim)
    assert wait_job(board, job, timeout=400).state is JobState.DONE
    assert board.deliveries(job)[chunk] >= 2
    t = tally(f"{broker_label(settings)}scale-in: drain, SIGTERM, SIGKILL after a 2 s grace mid-chunk", s3_server,
              bucket, board, job, 6)
    assert (t.stored, t.duplicates, t.lost) == (6, 0, 0)
