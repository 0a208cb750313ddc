"""`farm worker`: one Celery worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES.

Run as `python -m workers.supervisor --gpus all|none|0,1,...`. Without GPUs it runs
one CPU worker. A worker that dies is restarted; SIGTERM or SIGINT is passed on to
every worker, each finishes its current chunk (Celery's warm shutdown) and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from farm.keys import worker_queue

log = logging.getLogger("farm.supervisor")

#: A worker that dies sooner than this after its start is restarted only after a pause,
#: so a broken set-up does not spin.
RESTART_BACKOFF_SECONDS = 5.0


def detect_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def parse_gpus(value: str) -> list[str | None]:
    """'all' -> every GPU found (or one CPU worker); 'none' -> one CPU worker; '0,2' -> those."""
    if value == "none":
        return [None]
    if value == "all":
        return list(detect_gpus()) or [None]
    devices = [d.strip() for d in value.split(",") if d.strip()]
    if not devices:
        raise ValueError(f"--gpus: expected all, none or a list such as 0,1; got {value!r}")
    return devices


@dataclass
class Slot:
    gpu: str | None
    name: str
    process: subprocess.Popen | None = None
    started: float = 0.0


def worker_command(slot: Slot, queue: str, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--pool", "prefork", "--concurrency", "1",
        "--queues", worker_queue(queue, slot.name), "--hostname", slot.name, "--loglevel", loglevel,
        "--without-mingle", "--without-gossip", "--without-heartbeat",
    ]


def start(slot: Slot, queue: str, loglevel: str, siblings: int = 1) -> None:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = slot.gpu if slot.gpu is not None else ""
    if siblings > 1 and not env.get("FARM_CPU_THREADS"):
        # Workers on one host split its cores; torch would give each of them all of them.
        env["FARM_CPU_THREADS"] = str(max(1, (os.cpu_count() or 1) // siblings))
    slot.process = subprocess.Popen(worker_command(slot, queue, loglevel), env=env)
    slot.started = time.monotonic()
    log.info("started %s (pid %d) on %s", slot.name, slot.process.pid, f"GPU {slot.gpu}" if slot.gpu else "CPU")


def supervise(gpus: list[str | None], queue: str, loglevel: str = "INFO", name: str | None = None) -> int:
    host = name or socket.gethostname()
    slots = [Slot(g, f"farm-{'gpu' + g if g is not None else 'cpu'}@{host}") for g in gpus]
    stopping = False

    def stop(signum, _frame):
        nonlocal stopping
        stopping = True
        for slot in slots:
            if slot.process and slot.process.poll() is None:
                slot.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in slots:
        start(slot, queue, loglevel, len(slots))
    while True:
        if stopping:
            for slot in slots:
                if slot.process:
                    slot.process.wait()
            return 0
        for slot in slots:
            code = slot.process.poll()
            if code is not None and not stopping:
                log.warning("%s exited with %s; restarting", slot.name, code)
                if time.monotonic() - slot.started < RESTART_BACKOFF_SECONDS:
                    time.sleep(RESTART_BACKOFF_SECONDS)
                if not stopping:
                    start(slot, queue, loglevel, len(slots))
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm worker")
    parser.add_argument("--gpus", default="all")
    parser.add_argument("--queue", default=os.environ.get("FARM_QUEUE", "farm.render"))
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("--name", default=None, help="host part of the worker names")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve the workers' Prometheus metrics on this port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.metrics_port is not None:
        from farm import metrics

        # Each worker's rendering process writes its metrics here; this process serves them all.
        folder = metrics.serve_worker_metrics(args.metrics_port)
        log.info("metrics on :%d/metrics (from %s)", args.metrics_port, folder)
    return supervise(parse_gpus(args.gpus), args.queue, args.loglevel, args.name)


if __name__ == "__main__":
    sys.exit(main())
