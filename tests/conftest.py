"""Real services for the tests: one redis-server and one SeaweedFS S3 server per session.

Each test gets a flushed Redis database and its own bucket. Worker processes are
real Celery workers started as separate processes; readiness is waited for by
their announcement in Redis, never by a fixed sleep.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
import redis

from farm import keys
from farm.embedded import RedisServer, wait_until
from farm.settings import Settings
from workers.supervisor import Slot, worker_command

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """One torch thread in every test process and every worker it starts (before torch loads):
    the suite runs two test processes on two cores, and torch's default of a thread per core
    in each of them makes them wait on each other's spinning threads (20x slower here)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items) -> None:
    """The long tests first (faults, then the other end-to-end ones), so the two test processes
    end together on the short ones instead of one waiting on the other's last fault test."""
    def weight(item) -> int:
        return 0 if item.get_closest_marker("faults") else 1 if item.get_closest_marker("e2e") else 2

    items.sort(key=weight)
S3_ACCESS_KEY = "farm-test-key"
S3_SECRET_KEY = "farm-test-secret-Z3q9"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


#: SeaweedFS gives each of its servers an HTTP port and, 10,000 above it, a gRPC port.
GRPC_OFFSET = 10_000


def free_port_pair() -> int:
    """A loopback port that is free, and free 10,000 above it too."""
    import random

    for _ in range(200):
        port = random.randint(20_000, 65_535 - GRPC_OFFSET)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + GRPC_OFFSET))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of loopback ports")


class SeaweedS3:
    """`weed mini` with every server on ports of its own (free ones, not SeaweedFS's fixed
    defaults), so two test sessions can share a machine."""

    SERVERS = ("master", "volume", "filer", "s3", "admin")

    def __init__(self, directory: Path):
        self.dir = directory
        self.ports = {server: free_port_pair() for server in self.SERVERS}
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> "SeaweedS3":
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "farm", "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.log = open(self.dir / "weed.log", "wb")
        self.process = subprocess.Popen(
            [weed, "mini", f"-dir={self.dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             *(f"-{server}.port={port}" for server, port in self.ports.items()),
             # Servers we do not use, which would listen on fixed ports.
             "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
             f"-s3.config={config}", "-admin.ui=false"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        client = self.client()

        def up():
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited; see {self.dir / 'weed.log'}")
            try:
                client.list_buckets()
                return True
            except Exception:
                return False

        wait_until(up, 90, "SeaweedFS S3 to answer", interval=0.2)
        return self

    def client(self, secret: str = S3_SECRET_KEY):
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ACCESS_KEY,
                            aws_secret_access_key=secret, region_name="us-east-1",
                            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10))

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


_buckets = itertools.count()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """boto3's own variables pointing at the test server, as a user would set them."""
    env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server.endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def bucket(s3_server, s3_env) -> str:
    name = f"farm-test-{os.getpid()}-{next(_buckets)}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Built-in models built once for the whole run (every test process shares the folder; the
    build is atomic), so workers start in the same time every test."""
    from workers.tiny import TINY_MODELS, builtin_model_dir

    # Under pytest-xdist each process has its own base folder; their parent is the run's.
    root = tmp_path_factory.getbasetemp()
    path = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "farm-cache"
    path.mkdir(exist_ok=True)
    for name in TINY_MODELS:
        builtin_model_dir(name, path)
    return path


class WorkerProcs:
    """Real Celery worker processes, each in its own process group so a test can kill one whole."""

    def __init__(self, settings: Settings, env: dict, log_dir: Path):
        self.settings = settings
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self.dispatcher: subprocess.Popen | None = None

    def start_dispatcher(self) -> None:
        """`farm dispatcher` as its own process, as a user runs it; the pool needs one to get work."""
        log = open(self.log_dir / "dispatcher.log", "ab")
        self.dispatcher = subprocess.Popen([sys.executable, "-m", "farm.cli", "dispatcher"], env=self.env, cwd=ROOT,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.settings.require_state())
        wait_until(lambda: client.exists(keys.DISPATCHER), 60, "the dispatcher to start", 0.1)

    def kill_dispatcher(self, sig=signal.SIGKILL) -> None:
        os.killpg(self.dispatcher.pid, sig)
        self.dispatcher.wait(timeout=30)
        redis.Redis.from_url(self.settings.require_state()).delete(keys.DISPATCHER)

    def start(self, count: int = 1, timeout: float = 120, dispatcher: bool = True) -> list[str]:
        if dispatcher and (self.dispatcher is None or self.dispatcher.poll() is not None):
            self.start_dispatcher()
        names = []
        for _ in range(count):
            name = f"w{len(self.procs)}@test"
            log = open(self.log_dir / f"{name}.log", "ab")
            cmd = worker_command(Slot(None, name), self.settings.queue, "INFO")
            self.procs[name] = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
            names.append(name)
        client = redis.Redis.from_url(self.settings.require_state())
        wait_until(lambda: all(client.hexists(keys.WORKERS, n) for n in names), timeout, "workers to be ready", 0.1)
        return names

    def kill(self, name: str, sig=signal.SIGKILL) -> None:
        os.killpg(self.procs[name].pid, sig)
        self.procs[name].wait(timeout=60)

    def terminate(self, name: str, timeout: float = 120) -> None:
        """SIGTERM to the worker's main process only, as a supervisor or systemd sends it."""
        self.procs[name].send_signal(signal.SIGTERM)
        self.procs[name].wait(timeout=timeout)

    def stop_all(self) -> None:
        """At a test's end, SIGKILL: the test has checked what it wanted, its Redis database and
        bucket are thrown away, and a warm shutdown would cost a second or two per process. The
        graceful paths (SIGTERM mid-chunk, the supervisor passing it on) have tests of their own."""
        everything = [*self.procs.values(), *([self.dispatcher] if self.dispatcher else [])]
        for proc in everything:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in everything:
            proc.wait(timeout=30)



@pytest.fixture
def farm_settings(redis_url, cache_dir, bucket, s3_env) -> Settings:
    # One torch thread a worker: tests run up to two workers on two cores.
    return Settings.from_env().with_overrides(
        broker_url=redis_url, store=f"s3://{bucket}/renders", cache_dir=cache_dir, device="cpu", cpu_threads=1
    )


def _rabbitmq_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def rabbitmq_vhost():
    """A vhost of this test process on the machine's RabbitMQ (127.0.0.1:5672, guest/guest)."""
    if shutil.which("rabbitmqctl") is None or not _rabbitmq_answers():
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672 (or no rabbitmqctl to make a vhost)")
    name = f"farm-test-{os.getpid()}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True, timeout=60)
    yield name
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


_amqp_queues = itertools.count()


@pytest.fixture
def amqp_settings(farm_settings, rabbitmq_vhost, redis_url) -> Settings:
    """RabbitMQ as the broker, the job state in the test's Redis; a queue prefix per test, since the
    vhost is shared by the tests of this process."""
    return farm_settings.with_overrides(broker_url=f"amqp://guest:guest@127.0.0.1:5672/{rabbitmq_vhost}",
                                        state_url=redis_url, queue=f"farm.render{next(_amqp_queues)}")


@pytest.fixture(params=["redis", "rabbitmq"])
def pool_settings(request, farm_settings) -> Settings:
    """The test once with Redis as the broker and once with RabbitMQ."""
    return farm_settings if request.param == "redis" else request.getfixturevalue("amqp_settings")


def broker_label(settings: Settings) -> str:
    """What a fault-table row says of its broker."""
    return "" if settings.broker_is_redis else "RabbitMQ: "


@pytest.fixture
def workers_factory(tmp_path, s3_env):
    made = []

    def make(settings: Settings) -> WorkerProcs:
        env = {**os.environ, **s3_env, **settings.to_env(), "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
        procs = WorkerProcs(settings, env, tmp_path)
        made.append(procs)
        return procs

    yield make
    for procs in made:
        procs.stop_all()


def run_farm(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path | None = None):
    """The `farm` command, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "farm.cli", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT)


def wait_job(board, job_id: str, timeout: float = 240):
    from dispatcher.follow import follow

    return follow(board, job_id, timeout=timeout)


@contextmanager
def farm_serve(env: dict, *args: str):
    """`farm serve` on a free port, as a user starts it; yields its URL once it answers."""
    import httpx

    from farm.embedded import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "farm.cli", "serve", "--port", str(port), *args], cwd=ROOT,
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/openapi.json", timeout=2).status_code == 200
        except httpx.TransportError:
            assert server.poll() is None, server.stderr.read().decode()
            return False

    try:
        wait_until(up, 60, "farm serve to answer", interval=0.2)
        yield url
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
