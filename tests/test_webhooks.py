"""Webhooks against real Redis and a real HTTP receiver: signed, retried with backoff when the
receiver fails, delivered once per job end however often it is queued, given up after the
deadline, and never carried twice by two couriers at once."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading

import pytest

from dispatcher.submit import submit
from farm import keys, webhooks
from farm.embedded import wait_until
from farm.errors import SpecError
from farm.jobs import JobBoard
from farm.spec import parse_spec
from tests.webhook_receiver import Receiver

SECRET = "team-secret"


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(**kw) -> Receiver:
        made.append(Receiver(**kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def signed(r) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), r.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(r.signature, expected)


def carry_until(courier, redis_client, delivery_id: str, outcome: str) -> dict:
    """Run the courier round after round until the delivery is `delivered` or `gave_up`."""
    def settled():
        courier.run_once()
        return outcome in webhooks.delivery(redis_client, delivery_id)

    wait_until(settled, 30, f"the webhook to be {outcome}", interval=0.2)
    return webhooks.delivery(redis_client, delivery_id)


def ended_job(board: JobBoard, url: str, job_id: str = "job-hooked") -> str:
    board.create(job_id, total=2, chunks=1, store_url="/tmp/x", user="ann", webhook=url)
    board.mark_done(job_id, [0])
    board.mark_failed(job_id, {1: "a poison prompt"})
    board.close(job_id)
    return job_id


def test_a_job_end_is_signed_retried_past_two_failures_and_delivered_once(redis_client, receiver):
    hook = receiver(fail_first=2)
    board = JobBoard(redis_client)
    job_id = ended_job(board, hook.url)
    courier = webhooks.Courier(redis_client, SECRET)
    record = carry_until(courier, redis_client, webhooks.job_ended_id(job_id), "delivered")
    assert [r.answered for r in hook.received] == [500, 500, 200]
    assert all(signed(r) for r in hook.received)
    assert {r.delivery for r in hook.received} == {webhooks.job_ended_id(job_id)}
    body = json.loads(hook.received[-1].body)
    assert (body["event"], body["job"], body["state"], body["done"], body["failed"]) == \
        ("job.ended", job_id, "done with failures", 1, 1)
    assert body["failures"] == {"1": "a poison prompt"}
    assert record["attempts"] == "3"
    # Queued again (a second process saw the end too): nothing more is sent.
    board.close(job_id)
    webhooks.enqueue(redis_client, webhooks.job_ended_id(job_id), hook.url, {"again": True})
    assert courier.run_once() == 0 and len(hook.received) == 3
    assert redis_client.zcard(keys.WEBHOOKS_DUE) == 0


def test_a_receiver_down_past_the_deadline_is_given_up_on(redis_client, receiver):
    hook = receiver(fail_first=1000)
    job_id = ended_job(JobBoard(redis_client), hook.url)
    courier = webhooks.Courier(redis_client, SECRET, give_up_after=2.5)
    record = carry_until(courier, redis_client, webhooks.job_ended_id(job_id), "gave_up")
    assert "delivered" not in record and record["last_error"] == "HTTP 500"
    assert 1 <= len(hook.received) <= 3 and redis_client.zcard(keys.WEBHOOKS_DUE) == 0


def test_two_couriers_never_carry_the_same_delivery(redis_client, receiver):
    hook = receiver(delay=0.5)
    job_id = ended_job(JobBoard(redis_client), hook.url)
    couriers = [webhooks.Courier(redis_client, SECRET) for _ in range(4)]
    threads = [threading.Thread(target=c.run_once) for c in couriers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(hook.received) == 1
    assert "delivered" in webhooks.delivery(redis_client, webhooks.job_ended_id(job_id))


def test_a_webhook_without_a_secret_to_sign_it_is_refused_at_submission(farm_settings, redis_client):
    spec = parse_spec({"prompts": ["x"], "webhook": "https://hooks.example/farm"})
    with pytest.raises(SpecError) as refused:
        submit(spec, farm_settings)
    assert refused.value.problems[0][0] == "webhook"
    assert not redis_client.exists(keys.JOBS_INDEX)
    with pytest.raises(SpecError, match="webhook_each: needs a webhook"):
        parse_spec({"prompts": ["x"], "webhook_each": True})
    with pytest.raises(SpecError, match="webhook: must be an http"):
        parse_spec({"prompts": ["x"], "webhook": "file:///etc/passwd"})
