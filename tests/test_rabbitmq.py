"""RabbitMQ as the broker (FARM_BROKER_URL=amqp://..., the job state in Redis by FARM_STATE_URL):
the same per-worker queues, cancel and fault behaviour as with Redis, checked with real workers
and a real dispatcher. The machines here run RabbitMQ on 127.0.0.1:5672 (guest/guest); each test
process gets a vhost of its own, and the tests skip, saying why, where no RabbitMQ answers."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from dispatcher import control
from dispatcher.submit import submit
from farm import pool
from farm.embedded import wait_until
from farm.jobs import JobBoard, JobState
from tests.conftest import wait_job
from tests.test_faults import running_chunk_of, spec, taken_chunk, tally

pytestmark = [pytest.mark.e2e, pytest.mark.faults]
_queues = itertools.count()


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def vhost():
    if shutil.which("rabbitmqctl") is None or not _rabbitmq_answers():
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672 (or no rabbitmqctl to make a vhost)")
    name = f"farm-test-{os.getpid()}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True, timeout=60)
    yield name
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@pytest.fixture
def amqp_settings(farm_settings, vhost, redis_url):
    # A queue prefix per test: the vhost is shared by the tests of this process.
    return farm_settings.with_overrides(broker_url=f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
                                        state_url=redis_url, queue=f"farm.render{next(_queues)}")


def test_a_job_renders_through_rabbitmq_with_the_state_in_redis(amqp_settings, workers_factory, s3_server, bucket,
                                                                 redis_client):
    workers_factory(amqp_settings).start(2)
    job = submit(spec(8, batch=2), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    assert wait_job(board, job).state is JobState.DONE
    t = tally("RabbitMQ: a job on two workers", s3_server, bucket, board, job, 8)
    assert (t.stored, t.duplicates, t.lost, t.redelivered) == (8, 0, 0, 0)
    assert not redis_client.keys(f"{amqp_settings.queue}*")  # the queues are RabbitMQ's, not Redis lists


def test_rabbitmq_a_killed_workers_chunk_is_finished_by_another(amqp_settings, workers_factory, s3_server, bucket):
    workers = workers_factory(amqp_settings)
    victim, _ = workers.start(2)
    job = submit(spec(8, size=128, steps=60), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    chunk = taken_chunk(board, job, victim)
    workers.kill(victim)
    assert wait_job(board, job, timeout=400).state is JobState.DONE
    assert board.deliveries(job)[chunk] >= 2
    t = tally("RabbitMQ: SIGKILL one worker mid-chunk", s3_server, bucket, board, job, 8)
    assert (t.stored, t.duplicates, t.lost) == (8, 0, 0)


def test_rabbitmq_scale_in_drain_sigterm_then_sigkill_loses_nothing(amqp_settings, workers_factory, s3_server,
                                                                    bucket):
    workers = workers_factory(amqp_settings)
    victim, _ = workers.start(2)
    job = submit(spec(6, size=128, steps=100), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    chunk = taken_chunk(board, job, victim)
    pool.drain(board.redis, [victim])
    workers.procs[victim].send_signal(signal.SIGTERM)
    time.sleep(2)
    assert running_chunk_of(board, job, victim) == chunk
    workers.kill(victim)
    assert wait_job(board, job, timeout=400).state is JobState.DONE
    t = tally("RabbitMQ: scale-in, SIGKILL after a 2 s grace mid-chunk", s3_server, bucket, board, job, 6)
    assert (t.stored, t.duplicates, t.lost) == (6, 0, 0)


def test_rabbitmq_cancel_stops_the_job_mid_chunk(amqp_settings, workers_factory, s3_server, bucket):
    workers_factory(amqp_settings).start(1)
    job = submit(spec(8, size=128, steps=60), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    wait_until(lambda: board.status(job).running, 120, "a chunk to start")
    control.cancel(board, None, job)
    assert wait_job(board, job).state is JobState.CANCELLED
    wait_until(lambda: not board.status(job).running, 60, "the running chunk to stop")
    assert board.status(job).done < 8
