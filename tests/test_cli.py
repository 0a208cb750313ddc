"""The farm command as a new user meets it."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from PIL import Image

from farm import grids, keys
from farm.embedded import wait_until
from farm.store import LocalStore
from farm.stored import StoredJob
from tests.conftest import ROOT, run_farm
from workers.shapes import analysis

VERBS = ["run", "submit", "status", "results", "worker", "info"]


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help(verb):
    result = run_farm(verb, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


@pytest.mark.e2e
def test_quickstart_runs_on_a_fresh_machine_with_no_services(tmp_path, cache_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    env["FARM_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run([sys.executable, "-m", "farm.cli", "run", str(ROOT / "examples/quickstart.toml"),
                             "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    job_dir = tmp_path / "out" / result.stdout.strip().splitlines()[-1].split("/")[-1]
    images = sorted((job_dir / "images").glob("*.png"))
    assert len(images) == 48
    rows = [json.loads(line) for line in (job_dir / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 48 and {r["key"].split("/")[-1] for r in rows} == {p.name for p in images}
    assert json.loads((job_dir / "job.json").read_text())["items"] == 48
    grid, layout = grids.job_grid(StoredJob(LocalStore(job_dir.parent), job_dir.name))
    assert Image.open(job_dir / "grid.png").tobytes() == grid.tobytes() and len(layout.cells) == 48
    assert "48/48" in result.stderr
    # The first prompt at CFG 7 (the second grid cell): what a newcomer should see in the grid.
    red_on_white = [analysis.read(Image.open(path)) for path in images[24:30]]
    assert sum(r.colour == "red" and r.background == "white" for r in red_on_white) >= 4

    info = run_farm("info", str(images[0]))
    assert info.returncode == 0
    parsed = json.loads(info.stdout)
    assert parsed["Prompt"] == "a red circle on a white background" and parsed["Sampler"] == "Euler a"
    assert parsed["Seed"] == "1" and parsed["Model"] == "shapes-sd"


@pytest.mark.e2e
def test_farm_run_serve_opens_the_dashboard_on_the_embedded_farm_until_ctrl_c(tmp_path, cache_dir):
    import httpx

    from farm.embedded import free_port

    (tmp_path / "small.toml").write_text('model = "shapes-sd"\nprompts = ["a red circle"]\nseeds = [1, 2]\n'
                                         'steps = 2\nwidth = 64\nheight = 64\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    env["FARM_CACHE_DIR"] = str(cache_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    farm = subprocess.Popen([sys.executable, "-m", "farm.cli", "run", str(tmp_path / "small.toml"), "--out",
                             str(tmp_path / "out"), "--serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def finished():
            assert farm.poll() is None, farm.stderr.read()
            try:
                jobs = httpx.get(url + "/v1/jobs", timeout=5).json()["jobs"]  # no token: --no-auth
            except httpx.TransportError:
                return None
            return jobs if jobs and jobs[0]["state"] == "done" else None

        job = wait_until(finished, 240, "the job to be done, seen through the dashboard's API", interval=0.5)[0]
        assert httpx.get(url + "/").status_code == 200
        image = httpx.get(f"{url}/v1/jobs/{job['job']}/images/1")
        assert image.headers["content-type"] == "image/png" and Image.open(io.BytesIO(image.content)).size == (64, 64)
        assert farm.poll() is None  # the dashboard stays up once the job is done
    finally:
        farm.send_signal(signal.SIGINT)  # pytest-xdist's workers (and so this child) start with SIGINT ignored
        try:
            out, err = farm.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            farm.kill()
            raise
    assert farm.returncode == 0, err
    assert out.strip().splitlines()[-1].endswith(job["job"]) and f"{url}/jobs/{job['job']}" in err
    assert len(list((tmp_path / "out" / job["job"] / "images").glob("*.png"))) == 2


def test_status_of_unknown_job_exits_4(redis_url):
    result = run_farm("status", "job-nope", "--broker", redis_url)
    assert result.returncode == 4
    assert "no job 'job-nope'" in result.stderr


def test_submit_without_a_broker_names_the_setting(tmp_path):
    (tmp_path / "ok.toml").write_text('prompts = ["x"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    result = subprocess.run([sys.executable, "-m", "farm.cli", "submit", str(tmp_path / "ok.toml")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "FARM_BROKER_URL" in result.stderr


def test_info_on_a_png_without_parameters(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = run_farm("info", str(tmp_path / "plain.png"))
    assert result.returncode == 2 and "has no 'parameters' text" in result.stderr


@pytest.mark.e2e
def test_worker_starts_one_process_per_listed_gpu_and_stops_on_sigterm(redis_url, cache_dir, tmp_path):
    env = {**os.environ, "FARM_BROKER_URL": redis_url, "FARM_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "worker", "--gpus", "0,1", "--name", "gpuhost"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: client.hlen(keys.WORKERS) == 2, 120, "two workers", 0.1)
        assert sorted(k.decode() for k in client.hkeys(keys.WORKERS)) == ["farm-gpu0@gpuhost", "farm-gpu1@gpuhost"]
        assert _visible_devices("farm-gpu0@gpuhost") == "0"
        assert _visible_devices("farm-gpu1@gpuhost") == "1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert client.hlen(keys.WORKERS) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _visible_devices(worker_name: str) -> str | None:
    """CUDA_VISIBLE_DEVICES of the Celery worker process of that name, read from /proc."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"celery" in b" ".join(args) and worker_name.encode() in args:
                env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
                return env.get(b"CUDA_VISIBLE_DEVICES", b"").decode()
        except OSError:
            continue
    return None


def test_gpu_selection_without_gpus(monkeypatch):
    from workers.supervisor import parse_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse_gpus("all") == ["2", "3"]
    assert parse_gpus("0,1") == ["0", "1"]
    assert parse_gpus("none") == [None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parse_gpus("all") == [None]
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus(",")


def _worker_pid(worker_name: str) -> int | None:
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"celery" in b" ".join(args) and worker_name.encode() in args and b"--pool" in args:
                # the Celery parent: its own parent is not a Celery process
                parent = int((proc / "stat").read_text().split()[3])
                if b"celery" not in (Path("/proc") / str(parent) / "cmdline").read_bytes():
                    return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


@pytest.mark.e2e
def test_supervisor_restarts_a_worker_that_dies(redis_url, cache_dir):
    env = {**os.environ, "FARM_BROKER_URL": redis_url, "FARM_CACHE_DIR": str(cache_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli", "worker", "--gpus", "none", "--name", "restarts"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = redis.Redis.from_url(redis_url)
    name = "farm-cpu@restarts"
    try:
        wait_until(lambda: client.hexists(keys.WORKERS, name), 120, "the worker", 0.1)
        first = json.loads(client.hget(keys.WORKERS, name))["since"]
        pid = wait_until(lambda: _worker_pid(name), 30, "the worker's pid")
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: json.loads(client.hget(keys.WORKERS, name))["since"] != first, 120,
                   "the supervisor to start it again", 0.2)
        assert _worker_pid(name) not in (None, pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
