"""The feeder's choices, against real Redis and a local store, with the workers played by the test.

A played worker is an entry in the registry; "rendering" a chunk is marking its items
done and releasing it, exactly what a real worker writes. The end-to-end tests
(test_pool.py) run the same policies with real worker processes.
"""

from __future__ import annotations

import json
import time

import pytest

from dispatcher import control
from dispatcher.feeder import Feeder, load_plan
from dispatcher.submit import submit
from farm import keys, pool
from farm.celery_app import make_celery
from farm.jobs import JobBoard, JobState, unsettled
from farm.settings import Settings
from farm.spec import parse_spec
from farm.store import open_store


@pytest.fixture
def settings(redis_url, tmp_path) -> Settings:
    return Settings.from_env().with_overrides(broker_url=redis_url, store=str(tmp_path / "out"))


@pytest.fixture
def feeder(settings, redis_client) -> Feeder:
    return Feeder(redis_client, make_celery(settings), settings)


def job(settings, user="ann", items=40, batch=4, **spec):
    data = {"prompts": ["p"], "seeds": {"start": 1, "count": items}, "width": 64, "height": 64, "steps": 2,
            "batch_size": batch, **spec}
    return submit(parse_spec(data), settings, user=user).job_id


def worker(client, name, models=(), heartbeat=None):
    pool.register(client, name, keys.worker_queue("farm.render", name), "host", "none")
    pool.publish(client, name, models=list(models))
    if heartbeat is not None:
        client.hset(keys.worker_live(name), "heartbeat", heartbeat)
    return name


def assigned(client, name) -> list[tuple[str, int]]:
    rows = client.hgetall(keys.worker_assigned(name))
    return sorted(((k.decode().rsplit("/", 1)[0], int(k.decode().rsplit("/", 1)[1])) for k in rows),
                  key=lambda a: json.loads(rows[f"{a[0]}/{a[1]}".encode()])["at"])


def render_one(client, settings, name, hold: list | None = None) -> tuple[str, int] | None:
    """Play the worker: finish its oldest chunk, as tasks.run_chunk reports it."""
    work = assigned(client, name)
    if not work:
        return None
    job_id, number = work[0]
    plan = load_plan(open_store(settings.store), job_id)
    model = plan.chunk(number).items[0].model
    if hold is not None and model not in hold:
        hold.append(model)
        del hold[:-2]  # the model cache holds two
        pool.publish(client, name, models=hold, loads=json.loads(client.hget(keys.worker_live(name), "loads") or "0") + 1)
    board = JobBoard(client)
    if board.mark_done(job_id, list(plan.chunk_range(number))):
        board.close(job_id)
    pool.finished_chunk(client, name, job_id, number)
    return job_id, number


def queued_messages(client) -> int:
    return sum(client.llen(k) for k in client.keys("farm.render.*"))


def test_each_worker_gets_a_window_of_two_chunks_not_the_whole_job(settings, feeder, redis_client):
    a, b = worker(redis_client, "a"), worker(redis_client, "b")
    job(settings, items=400)
    assert feeder.top_up() == 4
    assert len(assigned(redis_client, a)) == len(assigned(redis_client, b)) == 2
    assert queued_messages(redis_client) == 4
    render_one(redis_client, settings, a)
    assert feeder.top_up() == 1 and len(assigned(redis_client, a)) == 2
    assert feeder.top_up() == 0


def test_interactive_lane_is_served_before_batch_and_priority_before_age(settings, feeder, redis_client):
    w = worker(redis_client, "w")
    slow = job(settings, items=400)
    feeder.top_up()
    quick = submit(parse_spec({"prompts": ["q"], "seeds": [1, 2], "width": 64, "height": 64, "steps": 2}), settings,
                   user="ann", lane="interactive").job_id
    urgent = job(settings, items=8, priority=5)
    order = []
    for _ in range(4):
        order.append(render_one(redis_client, settings, w))
        feeder.top_up()
    # The two chunks already assigned run first; then the interactive job, then the urgent one.
    assert [j for j, _ in order] == [slow, slow, quick, urgent]


def test_a_second_users_small_job_runs_at_once_and_a_big_one_then_shares_evenly(settings, feeder, redis_client):
    w = worker(redis_client, "w")
    big = job(settings, user="ann", items=2000)
    feeder.top_up()
    for _ in range(10):  # ann has the pool to herself for a while
        render_one(redis_client, settings, w)
        feeder.top_up()
    small = job(settings, user="bob", items=40)
    jobs = []
    while JobBoard(redis_client).status(small).state is not JobState.DONE:
        jobs.append(render_one(redis_client, settings, w)[0])
        feeder.top_up()
    # Bob's 10 chunks run next, after the one already waiting in the worker's queue.
    assert jobs.count(small) == 10 and jobs.count(big) <= 2

    huge = job(settings, user="cat", items=4000)
    jobs = []
    for _ in range(60):
        jobs.append(render_one(redis_client, settings, w)[0])
        feeder.top_up()
    # Cat's head start is a minute of charge (15 chunks at the default 4 s each); then the two share.
    assert jobs[2:17].count(huge) == 15
    assert 18 <= jobs[17:].count(big) <= 25


def test_three_models_on_two_workers_load_each_model_at_most_once_or_twice(settings, feeder, redis_client, tmp_path):
    models = []
    for name in ("m1", "m2", "m3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
        models.append(str(tmp_path / name))
    job(settings, items=20, batch=2, grid={"model": models})
    workers = {worker(redis_client, "a"): [], worker(redis_client, "b"): []}
    feeder.top_up()
    while any(assigned(redis_client, w) for w in workers):
        for name, held in workers.items():
            render_one(redis_client, settings, name, held)
        feeder.top_up()
    loads = sum(json.loads(redis_client.hget(keys.worker_live(w), "loads") or "0") for w in workers)
    assert loads <= 4


def test_a_dead_workers_chunks_go_to_a_live_one(settings, feeder, redis_client):
    dead = worker(redis_client, "dead")
    job_id = job(settings, items=8)
    feeder.top_up()
    lost = assigned(redis_client, dead)
    assert len(lost) == 2
    redis_client.hset(keys.worker_live(dead), "heartbeat", time.time() - 3600)
    alive = worker(redis_client, "alive")
    feeder.top_up()
    assert redis_client.hexists(keys.WORKERS, dead), "a feeder that just started takes nobody for dead"
    feeder.running_since -= 3600  # as if it had run for an hour
    feeder.top_up()
    assert not redis_client.hexists(keys.WORKERS, dead)
    assert assigned(redis_client, alive) == lost
    while render_one(redis_client, settings, alive):
        feeder.top_up()
    assert JobBoard(redis_client).status(job_id).state is JobState.DONE


def test_a_worker_forgotten_by_the_pool_comes_back_with_its_next_heartbeat(redis_client):
    entry = pool.register(redis_client, "w", "farm.render.w", "host", "0")
    redis_client.flushall()  # Redis lost its data
    pool.heartbeat(redis_client, "w", entry)
    [view] = pool.read(redis_client, "farm.render")
    assert (view.name, view.gpu, view.queue) == ("w", "0", "farm.render.w")


def test_chunks_lost_on_the_way_are_swept_back_in(settings, feeder, redis_client, monkeypatch):
    monkeypatch.setattr("dispatcher.feeder.SWEEP_INTERVAL", 0)
    w = worker(redis_client, "w")
    job_id = job(settings, items=12)
    feeder.top_up()
    # The broker lost both messages and the worker never saw them.
    redis_client.delete(keys.worker_assigned(w), keys.worker_queue("farm.render", w))
    while True:
        feeder.top_up()
        if not render_one(redis_client, settings, w):
            break
    assert JobBoard(redis_client).status(job_id).state is JobState.DONE


def test_paused_and_cancelled_jobs_get_nothing_and_resume_carries_on(settings, feeder, redis_client):
    w = worker(redis_client, "w")
    board = JobBoard(redis_client)
    paused, cancelled = job(settings, items=8), job(settings, user="bob", items=8)
    control.pause(board, paused)
    control.cancel(board, None, cancelled)
    assert feeder.top_up() == 0
    control.resume(board, open_store(settings.store), paused)
    assert feeder.top_up() == 2
    assert {j for j, _ in assigned(redis_client, w)} == {paused}
    assert board.status(cancelled).state is JobState.CANCELLED
    with pytest.raises(control.JobStateError):
        control.pause(board, cancelled)


def test_a_million_item_job_is_accepted_without_expanding_it(settings, feeder, redis_client):
    worker(redis_client, "w")
    started = time.monotonic()
    job_id = job(settings, items=500_000, prompts=["a", "b"], batch=8)
    assert time.monotonic() - started < 30
    assert feeder.top_up() == 2 and queued_messages(redis_client) == 2
    assert JobBoard(redis_client).status(job_id).total == 1_000_000
    assert redis_client.info("memory")["used_memory"] < 50 * 2**20


def test_unsettled_reads_redis_bit_order():
    done = bytes([0b10100000])
    failed = bytes([0b01000000])
    assert unsettled(done, failed, 5) == [3, 4]
    assert unsettled(None, None, 3) == [0, 1, 2]


def test_an_assignment_whose_message_never_reached_the_worker_is_handed_back(settings, feeder, redis_client):
    w = worker(redis_client, "w")
    job_id = job(settings, items=8)
    feeder.top_up()
    queue = keys.worker_queue("farm.render", w)
    assert pool.queued_chunks(redis_client, queue) == {f"{job_id}/0", f"{job_id}/1"}
    # Both messages are gone from the queue; the worker took chunk 1 and holds it, chunk 0 was lost.
    redis_client.delete(queue)
    pool.heartbeat(redis_client, w, holding=[f"{job_id}/1"])
    for key, row in redis_client.hgetall(keys.worker_assigned(w)).items():
        redis_client.hset(keys.worker_assigned(w), key, json.dumps({**json.loads(row), "at": time.time() - 3600}))
    feeder.running_since -= 3600
    assert feeder.top_up() == 1
    assert pool.queued_chunks(redis_client, queue) == {f"{job_id}/0"}
    assert sorted(n for _, n in assigned(redis_client, w)) == [0, 1]


def test_resume_puts_back_a_job_whose_submission_died_before_it_reached_its_lane(settings, feeder, redis_client):
    worker(redis_client, "w")
    job_id = job(settings, items=8)
    redis_client.zrem(keys.lane_jobs("batch"), job_id)  # `farm submit` killed between two writes
    assert feeder.top_up() == 0
    assert control.resume(JobBoard(redis_client), open_store(settings.store), job_id) is JobState.QUEUED
    assert feeder.top_up() == 2


def test_a_drained_worker_gets_no_new_chunk_until_it_starts_again(settings, feeder, redis_client):
    a, b = worker(redis_client, "a"), worker(redis_client, "b")
    job(settings, items=40)
    pool.drain(redis_client, [a])
    feeder.top_up()
    assert assigned(redis_client, a) == [] and len(assigned(redis_client, b)) == 2
    worker(redis_client, "a")  # the same name registers again: a new process, taking work
    feeder.top_up()
    assert len(assigned(redis_client, a)) == 2
