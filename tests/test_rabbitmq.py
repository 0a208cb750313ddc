"""RabbitMQ as the broker (FARM_BROKER_URL=amqp://..., the job state in Redis by FARM_STATE_URL):
the same per-worker queues and cancel as with Redis, with real workers and a real dispatcher. The
fault tests that kill workers mid-chunk run on both brokers (test_faults.py, `pool_settings`).
The machines here run RabbitMQ on 127.0.0.1:5672 (guest/guest); each test process gets a vhost of
its own (conftest), and the tests skip, saying why, where no RabbitMQ answers."""

from __future__ import annotations

import pytest

from dispatcher import control
from dispatcher.submit import submit
from farm.embedded import wait_until
from farm.jobs import JobBoard, JobState
from tests.conftest import wait_job
from tests.test_faults import spec, tally

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


def test_a_job_renders_through_rabbitmq_with_the_state_in_redis(amqp_settings, workers_factory, s3_server, bucket,
                                                                 redis_client):
    workers_factory(amqp_settings).start(2)
    job = submit(spec(8, batch=2), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    assert wait_job(board, job).state is JobState.DONE
    t = tally("RabbitMQ: a job on two workers", s3_server, bucket, board, job, 8)
    assert (t.stored, t.duplicates, t.lost, t.redelivered) == (8, 0, 0, 0)
    assert not redis_client.keys(f"{amqp_settings.queue}*")  # the queues are RabbitMQ's, not Redis lists


def test_rabbitmq_cancel_stops_the_job_mid_chunk(amqp_settings, workers_factory, s3_server, bucket):
    workers_factory(amqp_settings).start(1)
    job = submit(spec(8, size=128, steps=60), amqp_settings).job_id
    board = JobBoard.from_url(amqp_settings.state_url)
    wait_until(lambda: board.status(job).running, 120, "a chunk to start")
    control.cancel(board, None, job)
    assert wait_job(board, job).state is JobState.CANCELLED
    wait_until(lambda: not board.status(job).running, 60, "the running chunk to stop")
    assert board.status(job).done < 8
