"""The rules that keep a shared pool safe: JSON-only messages, Redis with a password or an ACL
user, secrets never written anywhere, results shared by presigned URL with an expiry."""

from __future__ import annotations

import json
import pickle
import time
import urllib.error
import urllib.request

import pytest

from dispatcher.submit import submit
from farm import keys
from farm.celery_app import make_celery
from farm.embedded import RedisServer, wait_until
from farm.jobs import JobBoard, JobState
from farm.spec import parse_spec
from tests.conftest import S3_SECRET_KEY, run_farm, wait_job

pytestmark = pytest.mark.e2e

SPEC = {"prompts": ["a red circle"], "seeds": [1, 2], "width": 64, "height": 64, "steps": 2, "batch_size": 2}


class Payload:
    """Unpickling this would run a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickled_message_is_refused_and_never_runs(farm_settings, workers_factory, tmp_path):
    [worker] = workers_factory(farm_settings).start(1)
    marker = tmp_path / "pwned"
    app = make_celery(farm_settings)
    # A producer may pick any serializer; the worker accepts JSON only.
    app.send_task(keys.RENDER_TASK, args=[Payload(marker)], serializer="pickle",
                  queue=keys.worker_queue(farm_settings.queue, worker))
    assert pickle.dumps(Payload(marker))  # the payload is real: it would run if unpickled
    log = tmp_path / f"{worker}.log"
    wait_until(lambda: "untrusted content" in log.read_text() or "ContentDisallowed" in log.read_text(), 60,
               "the worker to refuse the message", interval=0.2)
    assert not marker.exists()
    # The worker is unharmed and goes on rendering.
    job = submit(parse_spec(SPEC), farm_settings).job_id
    assert wait_job(JobBoard.from_url(farm_settings.broker_url), job).state is JobState.DONE
    assert not marker.exists()


@pytest.mark.parametrize("user", [None, "farm-team"])
def test_redis_with_a_password_of_special_characters_and_no_secret_in_any_output(
        farm_settings, workers_factory, tmp_path, s3_env, s3_server, bucket, user):
    password = "p@ss:w/rd#?%1 x"
    with RedisServer(tmp_path / "locked", password=password, user=user) as server:
        assert "p%40ss%3Aw%2Frd%23%3F%251%20x" in server.url
        settings = farm_settings.with_overrides(broker_url=server.url)
        workers_factory(settings).start(1)
        job = submit(parse_spec(SPEC), settings).job_id
        board = JobBoard.from_url(server.url)
        assert wait_job(board, job).state is JobState.DONE

        env = {**s3_env, **settings.to_env()}
        outputs = [run_farm(*args, env=env) for args in
                   (("status", job), ("status", job, "--json"), ("workers", "--json"), ("results", job, "--urls"),
                    ("status", "no-such-job"))]
        assert [o.returncode for o in outputs] == [0, 0, 0, 0, 4]
        wrong = run_farm("status", job, env={**env, "FARM_BROKER_URL": server.url.replace("p%40ss", "nope")})
        assert wrong.returncode == 3
        texts = [o.stdout + o.stderr for o in outputs + [wrong]]
        texts += [p.read_text(errors="replace") for p in tmp_path.glob("*.log")]
        client = s3_server.client()
        for obj in client.list_objects_v2(Bucket=bucket)["Contents"]:
            texts.append(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode("latin-1"))
        for key in board.redis.keys("farm:*"):
            if board.redis.type(key) == b"hash":
                texts.append(json.dumps({k.decode(): v.decode("latin-1") for k, v in board.redis.hgetall(key).items()}))
        everything = "\n".join(texts)
        for secret in (password, "p%40ss%3Aw%2Frd", S3_SECRET_KEY):
            assert secret not in everything, f"{secret!r} leaked"


def test_results_are_shared_by_presigned_urls_that_expire(farm_settings, workers_factory, s3_env):
    workers_factory(farm_settings).start(1)
    job = submit(parse_spec(SPEC), farm_settings).job_id
    assert wait_job(JobBoard.from_url(farm_settings.broker_url), job).state is JobState.DONE
    env = {**s3_env, **farm_settings.to_env()}

    result = run_farm("results", job, "--urls", "--expires", "1h", env=env)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split("\t") for line in result.stdout.splitlines())
    assert sorted(rows) == [f"{job}/images/000000-1.png", f"{job}/images/000001-2.png", f"{job}/manifest.jsonl"]
    url = rows[f"{job}/images/000000-1.png"]
    assert S3_SECRET_KEY not in result.stdout
    with urllib.request.urlopen(url) as response:  # no credentials: the URL is the permission
        assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"

    short = run_farm("results", job, "--urls", "--expires", "1s", env=env)
    expired = short.stdout.splitlines()[0].split("\t")[1]
    time.sleep(2.5)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(expired)
    assert e.value.code == 403
    assert run_farm("results", job, "--urls", "--expires", "30d", env=env).returncode == 2
