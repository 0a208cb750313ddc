from farm import keys
from farm.jobs import JobBoard, JobState


def test_counts_are_exact_under_redelivery_and_completion_fires_once(redis_client):
    board = JobBoard(redis_client)
    board.create("job-a", total=6, chunks=2, store_url="/tmp/x", user="ann")
    assert board.start_chunk("job-a", 0, "w1", 3) == (JobState.QUEUED, 1)
    assert board.status("job-a").state is JobState.RUNNING
    assert board.start_chunk("job-a", 0, "w2", 3) == (JobState.RUNNING, 2)  # redelivered
    assert board.mark_done("job-a", [0, 1, 2]) is False
    assert board.mark_done("job-a", [0, 1, 2]) is False  # redelivered chunk: no double count
    assert board.status("job-a").done == 3
    assert board.mark_failed("job-a", {3: "corrupt init image"}) is False
    assert board.mark_done("job-a", [3, 4]) is False  # a retry elsewhere succeeded
    status = board.status("job-a")
    assert (status.done, status.failed) == (5, 0)
    assert board.done_among("job-a", [2, 5, 6]) == {2}
    assert board.mark_done("job-a", [5]) is True
    assert board.mark_done("job-a", [5]) is False
    assert board.close("job-a") is JobState.DONE


def test_failures_are_listed_with_reasons_and_end_the_job(redis_client):
    board = JobBoard(redis_client)
    board.create("job-b", total=2, chunks=1, store_url="/tmp/x", user="ann")
    board.mark_done("job-b", [0])
    assert board.mark_failed("job-b", {1: "model 'x' not found"}) is True
    assert board.close("job-b") is JobState.DONE_WITH_FAILURES
    status = board.status("job-b")
    assert status.failures == {1: "model 'x' not found"} and status.queued == 0


def test_running_and_queued_counts(redis_client):
    board = JobBoard(redis_client)
    board.create("job-c", total=10, chunks=3, store_url="/tmp/x", user="ann")
    board.start_chunk("job-c", 0, "w1", 4)
    board.start_chunk("job-c", 1, "w2", 4)
    board.mark_done("job-c", [0, 1, 2, 3])
    board.clear_running("job-c", 0)
    status = board.status("job-c")
    assert (status.running, status.done, status.queued) == (4, 4, 2)
    assert status.workers == ["w2"]
    assert board.deliveries("job-c") == {0: 1, 1: 1}


def test_a_chunk_counted_done_before_its_row_is_cleared_does_not_count_twice(redis_client):
    board = JobBoard(redis_client)
    board.create("job-r", total=8, chunks=2, store_url="/tmp/x", user="ann")
    board.mark_done("job-r", [0, 1, 2, 3])
    board.set_running("job-r", 1, {"worker": "w1", "items": 4, "since": 0.0, "fraction": 0.5})
    status = board.status("job-r")
    assert (status.running, status.partial) == (4, 2.0)
    board.mark_done("job-r", [4, 5, 6, 7])  # the worker's next round trip clears the row
    status = board.status("job-r")
    assert (status.done, status.running, status.partial, status.queued) == (8, 0, 0.0, 0)


def test_a_chunk_of_a_paused_cancelled_or_unknown_job_is_not_started(redis_client):
    board = JobBoard(redis_client)
    board.create("job-d", total=4, chunks=2, store_url="/tmp/x", user="ann")
    for state in (JobState.PAUSED, JobState.CANCELLED, JobState.DONE):
        redis_client.hset(keys.job_hash("job-d"), "state", state.value)
        assert board.start_chunk("job-d", 0, "w1", 2) == (state, 0)
    assert board.start_chunk("job-nobody", 0, "w1", 2) == (None, 0)
    assert board.deliveries("job-d") == {} and board.status("job-d").running == 0
