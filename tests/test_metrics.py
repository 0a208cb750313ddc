"""Prometheus metrics and Flower: the pool's figures read from Redis are exact under redelivery and
cancel; a real `farm dispatcher` and `farm worker` serve them, parsed with prometheus_client's own
parser; Flower finds the worker and its finished tasks through the test broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.control import cancel
from dispatcher.submit import submit
from farm import fairshare, keys, metrics
from farm.embedded import free_port, wait_until
from farm.jobs import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import ROOT, wait_job


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _scrape(client) -> dict[tuple[str, tuple], float]:
    return _samples(metrics.prom.generate_latest(metrics.pool_registry(client)).decode())


def _job(board: JobBoard, job_id: str, total: int, lane: str = "batch", user: str = "ann") -> None:
    board.create(job_id, total=total, chunks=1, store_url="/tmp/x", user=user, lane=lane)
    fairshare.enlist(board, job_id, lane, user, 1.0)


def test_the_pools_figures_are_exact_under_redelivery_and_cancel(redis_client):
    board = JobBoard(redis_client)
    _job(board, "a-1", 10)
    _job(board, "b-1", 4, lane="interactive", user="bob")
    board.mark_done("a-1", [0, 1, 2])
    board.mark_done("a-1", [1, 2, 3])  # a redelivered chunk: 1 and 2 again
    board.mark_failed("a-1", {9: "out of memory"})
    got = _scrape(redis_client)
    assert got[("farm_items_total", (("lane", "batch"), ("state", "done"), ("user", "ann")))] == 4
    assert got[("farm_items_total", (("lane", "batch"), ("state", "failed"), ("user", "ann")))] == 1
    assert got[("farm_lane_waiting_items", (("lane", "batch"),))] == 5
    assert got[("farm_lane_waiting_items", (("lane", "interactive"),))] == 4
    assert got[("farm_items_queued", (("lane", "interactive"), ("user", "bob")))] == 4
    assert got[("farm_jobs_runnable", (("lane", "batch"), ("user", "ann")))] == 1
    cancel(board, None, "b-1")
    got = _scrape(redis_client)
    assert got[("farm_lane_waiting_items", (("lane", "interactive"),))] == 0
    assert ("farm_jobs_runnable", (("lane", "interactive"), ("user", "bob"))) not in got


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        return answer.read().decode()


def _start(args: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.e2e
def test_a_dispatcher_and_a_worker_serve_their_metrics(farm_settings, s3_env, tmp_path):
    env = {**os.environ, **s3_env, **farm_settings.to_env(), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    worker_port, dispatcher_port = free_port(), free_port()
    log = open(tmp_path / "procs.log", "ab")
    procs = [_start(["farm.cli", "worker", "--gpus", "none", "--name", "metered", "--metrics-port",
                     str(worker_port)], env, log),
             _start(["farm.cli", "dispatcher", "--metrics-port", str(dispatcher_port)], env, log)]
    try:
        client = redis.Redis.from_url(farm_settings.broker_url)
        wait_until(lambda: client.hexists(keys.WORKERS, "farm-cpu@metered"), 120, "the worker")
        spec = parse_spec({"prompts": ["a red circle", "a blue square"], "seeds": [1, 2, 3], "steps": 2,
                           "width": 64, "height": 64, "batch_size": 3})
        job_id = submit(spec, farm_settings, user="ann").job_id
        assert wait_job(JobBoard(client), job_id).state is JobState.DONE
        pool = _samples(_get(f"http://127.0.0.1:{dispatcher_port}/metrics"))
        assert pool[("farm_items_total", (("lane", "batch"), ("state", "done"), ("user", "ann")))] == 6
        assert pool[("farm_workers", ())] == 1
        assert not [name for name, _ in pool if name.startswith("farm_worker_")]  # those are the workers' own
        worker = wait_until(lambda: (s := _samples(_get(f"http://127.0.0.1:{worker_port}/metrics")))
                            .get(("farm_worker_images_total", (("model", "tiny-sd"),))) == 6 and s, 30,
                            "the worker's count")
        assert worker[("farm_worker_image_seconds_count", (("model", "tiny-sd"), ("size", "64x64")))] == 6
        assert worker[("farm_worker_model_loads_total", ())] >= 1
        memory = [v for (name, labels), v in worker.items() if name == "farm_worker_memory_bytes"]
        assert memory and all(v > 10_000_000 for v in memory)  # a rendering process's RSS
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.e2e
def test_flower_shows_the_worker_and_its_finished_tasks(farm_settings, workers_factory, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "ab")
    flower = _start(["celery", "--broker", farm_settings.broker_url, "flower", f"--port={port}",
                     "--address=127.0.0.1"], {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}, log)
    try:
        wait_until(lambda: _reachable(f"http://127.0.0.1:{port}/healthcheck"), 60, "Flower")
        [name] = workers_factory(farm_settings).start(1)
        spec = parse_spec({"prompts": ["a red circle"], "seeds": [1, 2], "steps": 2, "width": 64, "height": 64,
                           "batch_size": 1})
        job_id = submit(spec, farm_settings).job_id
        assert wait_job(JobBoard.from_url(farm_settings.broker_url), job_id).state is JobState.DONE

        def finished():
            tasks = json.loads(_get(f"http://127.0.0.1:{port}/api/tasks"))
            done = [t for t in tasks.values() if t["name"] == keys.RENDER_TASK and t["state"] == "SUCCESS"]
            return len(done) == 2 and done

        done = wait_until(finished, 60, "Flower to see the tasks")
        assert {t["worker"] for t in done} == {name}
        workers = json.loads(_get(f"http://127.0.0.1:{port}/api/workers?refresh=1"))
        assert name in workers
    finally:
        os.killpg(flower.pid, signal.SIGKILL)
        flower.wait(timeout=30)


def _reachable(url: str) -> bool:
    try:
        return _get(url) is not None
    except OSError:
        return False
