"""The REST API (`farm serve`) against real Redis and the S3 server: submission validated as
`farm submit` validates it, explicit states and 404s, tokens and isolation between users,
and one job through a real worker, its images read back over HTTP."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from farm import keys, png, webhooks
from farm.embedded import wait_until
from farm.jobs import JobBoard
from farm.tokens import TokenBook
from tests.conftest import farm_serve, run_farm, wait_job
from tests.mutations import BASE, mutations
from tests.test_spec import BAD, VALID
from tests.webhook_receiver import Receiver

SMALL = {"model": "shapes-sd", "prompts": ["a red circle"], "seeds": [1, 2], "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def api(farm_settings):
    from dispatcher.api import create_app

    with TestClient(create_app(farm_settings)) as client:
        yield client


@pytest.fixture
def tokens(redis_client):
    book = TokenBook(redis_client)
    return {"ann": book.create("ann"), "bob": book.create("bob"), "root": book.create("ops", admin=True)}


def as_(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def _nothing_written(redis_client, s3_server, bucket) -> bool:
    listed = s3_server.client().list_objects_v2(Bucket=bucket).get("KeyCount", 0)
    return redis_client.keys(keys.job_hash("") + "*") == [] and not redis_client.exists(keys.JOBS_INDEX) \
        and listed == 0


def test_a_job_is_submitted_and_answers_with_its_state_and_place_in_the_lane(api, tokens):
    first = api.post("/v1/jobs", json=SMALL, headers=as_(tokens["ann"]))
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["items"], body["chunks"], body["state"]) == (2, 1, "queued")
    second = api.post("/v1/jobs", json={**SMALL, "name": "later"}, headers=as_(tokens["ann"])).json()

    job = api.get(f"/v1/jobs/{body['id']}", headers=as_(tokens["ann"])).json()
    assert (job["state"], job["total"], job["queued"], job["user"], job["queue_position"]) == ("queued", 2, 2, "ann", 0)
    assert api.get(f"/v1/jobs/{second['id']}", headers=as_(tokens["ann"])).json()["queue_position"] == 1

    listed = api.get("/v1/jobs", headers=as_(tokens["ann"])).json()["jobs"]
    assert [j["job"] for j in listed] == [second["id"], body["id"]]
    assert [j["job"] for j in api.get("/v1/jobs?limit=1&offset=1", headers=as_(tokens["ann"])).json()["jobs"]] \
        == [body["id"]]
    assert api.get("/v1/jobs?state=done", headers=as_(tokens["ann"])).json()["jobs"] == []


@pytest.mark.parametrize("expected, data", BAD, ids=[e.split(":")[0] + "-" + str(i) for i, (e, _) in enumerate(BAD)])
def test_a_bad_spec_answers_422_naming_the_field_and_nothing_is_queued(api, tokens, redis_client, s3_server, bucket,
                                                                       expected, data):
    answer = api.post("/v1/jobs", json=data, headers=as_(tokens["ann"]))
    assert answer.status_code == 422
    problems = answer.json()["detail"]
    field, reason = expected.split(": ", 1)
    if field == "model":  # a path on the server is refused before it is looked for
        reason = "built-in models"
    assert any(p["field"] == field and reason in p["msg"] for p in problems), problems
    assert _nothing_written(redis_client, s3_server, bucket)


def test_every_mutation_of_a_valid_body_is_refused_naming_its_field_and_nothing_is_queued(
        farm_settings, tokens, redis_client, s3_server, bucket):
    from dispatcher.api import create_app

    api = TestClient(create_app(farm_settings.with_overrides(webhook_secret="team-secret")))
    cases = list(mutations())
    assert len(cases) >= 100
    wrong = []
    for what, field, body in cases:
        answer = api.post("/v1/jobs", json=body, headers=as_(tokens["ann"]))
        named = [p["field"] for p in answer.json()["detail"]] if answer.status_code == 422 else []
        if answer.status_code != 422 or not any(f == field or f.startswith((field + ".", field + "["))
                                                for f in named):
            wrong.append((what, answer.status_code, named or answer.text[:200]))
    assert wrong == []
    assert _nothing_written(redis_client, s3_server, bucket)
    for body in (b"[1, 2]", b'"a spec"', b"{", b'{"prompts": ["x"],}', b"\xff\xfe"):
        answer = api.post("/v1/jobs", content=body, headers={**as_(tokens["ann"]), "content-type": "application/json"})
        assert answer.status_code == 422 and answer.json()["detail"][0]["field"] in ("spec", "body"), (body, answer.text)
    assert _nothing_written(redis_client, s3_server, bucket)
    assert api.post("/v1/jobs", json=BASE, headers=as_(tokens["ann"])).status_code == 201


@pytest.mark.parametrize("changes, field", [
    ({"prompts_file": "/etc/passwd"}, "prompts_file"),
    ({"mode": "img2img", "init_image": "/etc/hostname", "denoising_strength": 0.5}, "init_image"),
    ({"mode": "inpaint", "init_image": "store:x.png", "mask": "../../m.png", "denoising_strength": 0.5}, "mask"),
    ({"model": "/srv/models/private.safetensors"}, "model"),
    ({"vae": "../vae.safetensors"}, "vae"),
    ({"loras": {"mine": "/srv/loras/private.safetensors"}}, "loras.mine"),
    ({"export": {"format": "parquet", "dest": "/etc/cron.d"}}, "export.dest"),
])
def test_a_client_cannot_make_the_server_read_its_own_files(api, tokens, redis_client, s3_server, bucket,
                                                            changes, field):
    answer = api.post("/v1/jobs", json={**VALID, **changes}, headers=as_(tokens["ann"]))
    assert answer.status_code == 422
    assert field in [p["field"] for p in answer.json()["detail"]]
    assert _nothing_written(redis_client, s3_server, bucket)


def test_init_images_come_as_base64_and_are_uploaded_to_the_store(api, tokens, farm_settings, s3_server, bucket):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    encoded = base64.b64encode(buffer.getvalue()).decode()
    spec = {**SMALL, "mode": "img2img", "init_image": "data:image/png;base64," + encoded, "denoising_strength": 0.5}
    answer = api.post("/v1/jobs", json=spec, headers=as_(tokens["ann"]))
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["id"]
    stored = json.loads(s3_server.client().get_object(Bucket=bucket, Key=f"renders/{job_id}/job.json")["Body"].read())
    key = stored["spec"]["init_image"]
    assert key.startswith(f"store:{job_id}/inputs/")
    uploaded = s3_server.client().get_object(Bucket=bucket, Key="renders/" + key.removeprefix("store:"))["Body"].read()
    assert uploaded == buffer.getvalue()

    broken = api.post("/v1/jobs", json={**spec, "init_image": base64.b64encode(b"not an image").decode()},
                      headers=as_(tokens["ann"]))
    assert broken.status_code == 422 and broken.json()["detail"][0]["field"] == "init_image"


def test_tokens_decide_who_may_see_and_control_a_job(api, tokens, redis_client):
    job_id = api.post("/v1/jobs", json=SMALL, headers=as_(tokens["ann"])).json()["id"]
    assert api.get(f"/v1/jobs/{job_id}").status_code == 401
    assert api.get(f"/v1/jobs/{job_id}", headers=as_("farm_not-a-token")).status_code == 401
    # Another user's job is as unknown to bob as a job that never was; an admin sees it.
    assert api.get(f"/v1/jobs/{job_id}", headers=as_(tokens["bob"])).status_code == 404
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=as_(tokens["bob"])).status_code == 404
    assert api.get("/v1/jobs", headers=as_(tokens["bob"])).json()["jobs"] == []
    assert api.get(f"/v1/jobs/{job_id}", headers=as_(tokens["root"])).status_code == 200
    assert [j["job"] for j in api.get("/v1/jobs", headers=as_(tokens["root"])).json()["jobs"]] == [job_id]
    # HTTP Basic with user:token, as the webui's --api-auth; the user must be the token's.
    assert api.get(f"/v1/jobs/{job_id}", auth=("ann", tokens["ann"])).status_code == 200
    assert api.get(f"/v1/jobs/{job_id}", auth=("bob", tokens["ann"])).status_code == 401
    TokenBook(redis_client).revoke(tokens["ann"])
    assert api.get(f"/v1/jobs/{job_id}", headers=as_(tokens["ann"])).status_code == 401
    stored = b" ".join(k + b" " + v for k, v in redis_client.hgetall(keys.TOKENS).items())
    assert tokens["bob"].encode() not in stored and tokens["root"].encode() not in stored


def test_every_id_has_a_state_and_an_unknown_one_is_404(api, tokens):
    who = as_(tokens["ann"])
    for path in ("/v1/jobs/job-20990101-000000-abcdef", "/v1/jobs/..%2F..%2Fetc", "/v1/jobs/nope/items"):
        assert api.get(path, headers=who).status_code == 404, path
    job_id = api.post("/v1/jobs", json=SMALL, headers=who).json()["id"]
    assert api.post(f"/v1/jobs/{job_id}/resume", headers=who).status_code == 409  # queued, not paused
    assert api.post(f"/v1/jobs/{job_id}/pause", headers=who).json()["state"] == "paused"
    assert api.post(f"/v1/jobs/{job_id}/resume", headers=who).json()["state"] == "queued"
    assert api.patch(f"/v1/jobs/{job_id}", json={"priority": 50}, headers=who).json()["priority"] == 50
    bad = api.patch(f"/v1/jobs/{job_id}", json={"priority": 500}, headers=who)
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "priority"
    refused = api.patch(f"/v1/jobs/{job_id}", json={"state": "done"}, headers=who).json()["detail"]
    assert [p["field"] for p in refused] == ["priority", "state"]  # missing, and not one PATCH changes
    items = api.get(f"/v1/jobs/{job_id}/items", headers=who).json()
    assert [i["state"] for i in items["items"]] == ["pending", "pending"]
    assert api.get(f"/v1/jobs/{job_id}/images/0", headers=who).status_code == 404
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=who).json()["state"] == "cancelled"
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=who).status_code == 409


def test_job_events_are_sent_when_a_job_moves_and_once_when_it_ends(redis_client):
    from dispatcher.api import JobChanges

    board = JobBoard(redis_client)
    for job_id, user in (("job-old", "ann"), ("job-a", "ann"), ("job-b", "bob")):
        board.create(job_id, total=2, chunks=1, store_url="/tmp/x", user=user)
    board.mark_done("job-old", [0, 1])
    board.close("job-old")
    changes = JobChanges(board, "ann")
    assert [e["job"] for e in changes.poll()] == ["job-a"]  # ended before we came: history
    assert changes.poll() == []
    board.mark_done("job-a", [0])
    assert [(e["job"], e["done"]) for e in changes.poll()] == [("job-a", 1)]
    board.mark_done("job-a", [1])
    board.close("job-a")
    assert [(e["job"], e["state"]) for e in changes.poll()] == [("job-a", "done")]
    assert changes.poll() == []
    assert [e["job"] for e in JobChanges(board, None).poll()] == ["job-b"]


def test_a_body_over_the_limit_answers_413_and_too_much_waiting_work_429(farm_settings, tokens):
    from dispatcher.api import create_app

    with TestClient(create_app(farm_settings.with_overrides(api_max_body=1000, api_max_queued=5))) as client:
        answer = client.post("/v1/jobs", content=b"{" + b" " * 2000 + b"}", headers={
            **as_(tokens["ann"]), "content-type": "application/json"})
        assert answer.status_code == 413

        def chunked():
            for _ in range(10):
                yield b" " * 500

        answer = client.post("/v1/jobs", content=chunked(), headers={**as_(tokens["ann"]),
                                                                     "content-type": "application/json"})
        assert answer.status_code == 413
        four = {**SMALL, "seeds": [1, 2, 3, 4]}
        assert client.post("/v1/jobs", json=four, headers=as_(tokens["ann"])).status_code == 201
        refused = client.post("/v1/jobs", json=SMALL, headers=as_(tokens["ann"]))
        assert refused.status_code == 429 and "4 items waiting" in refused.json()["detail"]
        assert client.post("/v1/jobs", json=SMALL, headers=as_(tokens["bob"])).status_code == 201


@pytest.mark.e2e
def test_a_job_submitted_over_http_renders_its_images_come_back_and_its_webhook_fires(
        tokens, farm_settings, workers_factory):
    from dispatcher.api import create_app

    settings = farm_settings.with_overrides(webhook_secret="team-secret")
    hook = Receiver()
    workers_factory(settings).start(1)
    who = as_(tokens["ann"])
    with TestClient(create_app(settings)) as api:
        job_id = api.post("/v1/jobs", json={**SMALL, "webhook": hook.url, "webhook_each": True}, headers=who).json()["id"]
        wait_job(JobBoard.from_url(settings.broker_url), job_id)
        _check_the_finished_job(api, who, job_id)
    wait_until(lambda: len(hook.received) == 3, 30, "the item and job webhooks")
    hook.close()
    events = sorted((json.loads(r.body)["event"], json.loads(r.body).get("index", -1)) for r in hook.received)
    assert events == [("item.stored", 0), ("item.stored", 1), ("job.ended", -1)]
    assert all(r.signature == webhooks.sign("team-secret", r.body) for r in hook.received)


def _check_the_finished_job(api, who, job_id):
    job = api.get(f"/v1/jobs/{job_id}", headers=who).json()
    assert (job["state"], job["done"], job["queue_position"]) == ("done", 2, None)
    items = api.get(f"/v1/jobs/{job_id}/items", headers=who).json()["items"]
    assert [(i["state"], i["record"]["seed"]) for i in items] == [("done", 1), ("done", 2)]
    image = api.get(items[1]["image_url"], headers=who)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert "Seed: 2" in png.read_parameters(image.content)
    workers = api.get("/v1/workers", headers=who).json()["workers"]
    assert len(workers) == 1 and workers[0]["images"] == 2


def test_farm_serve_and_farm_token_as_a_user_runs_them(farm_settings, s3_env):
    env = {**s3_env, **farm_settings.to_env()}
    created = run_farm("token", "create", "--user", "cli-user", env=env, timeout=60)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    with farm_serve(env) as url:
        assert "/v1/jobs/{job_id}" in httpx.get(url + "/openapi.json").json()["paths"]
        answer = httpx.post(url + "/v1/jobs", json=SMALL, headers=as_(token))
        assert answer.status_code == 201
        job_id = answer.json()["id"]
        assert httpx.get(f"{url}/v1/jobs/{job_id}", headers=as_(token)).json()["user"] == "cli-user"
        assert httpx.get(url + "/v1/workers").status_code == 401
        with httpx.stream("GET", url + "/v1/events", headers=as_(token), timeout=30) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            states = []
            for line in events.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    assert event["job"] == job_id
                    states.append(event["state"])
                    if event["state"] == "queued":
                        httpx.post(f"{url}/v1/jobs/{job_id}/cancel", headers=as_(token))
                    if event["state"] == "cancelled":
                        break
        assert states == ["queued", "cancelled"]
    revoked = run_farm("token", "revoke", token, env=env, timeout=60)
    assert revoked.returncode == 0 and run_farm("token", "revoke", token, env=env, timeout=60).returncode == 2


def test_the_dashboards_login_cookie_stands_for_the_token(api, tokens):
    page = api.get("/")
    assert page.status_code == 200 and "EventSource('/v1/events')" in page.text
    assert api.get("/v1/jobs").status_code == 401
    login = api.post("/login", data={"token": tokens["ann"]}, follow_redirects=False)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert api.get("/v1/jobs").status_code == 200
    api.cookies.clear()
    assert api.get("/v1/jobs").status_code == 401
