"""A 1,000,000-item sweep: how fast it is accepted, and what it costs the dispatcher and Redis.

Submits the job with `farm submit` in its own process (its peak RSS is the submitting
dispatcher's), then lets `farm dispatcher` (its own process) feed one CPU worker for a
while, sampling the dispatcher's RSS and Redis's used memory, then cancels the job.

    python -m bench.huge_job --feed-seconds 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from farm.connections import connect
from farm.embedded import EmbeddedFarm, wait_until
from farm.settings import Settings

SPEC = {"name": "million", "prompts": [f"a red circle, variant {i}" for i in range(1000)],
        "seeds": {"start": 0, "count": 1000}, "width": 64, "height": 64, "steps": 2, "batch_size": 8}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feed-seconds", type=float, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        settings = Settings.from_env().with_overrides(store=str(tmp / "store"), cache_dir=tmp / "cache", device="cpu")
        # Redis first, alone: the job is submitted before any worker or dispatcher runs.
        embedded = EmbeddedFarm(settings, tmp, name="huge", dispatcher="process")
        embedded.server.start()
        env = {**os.environ, **embedded.settings.to_env()}
        (tmp / "million.json").write_text(json.dumps(SPEC))
        client = connect(embedded.settings)
        before = client.info("memory")["used_memory"]
        started = time.perf_counter()
        submitted = subprocess.run(
            [sys.executable, "-c", "import resource, runpy, sys; sys.argv = ['farm', 'submit', sys.argv[1]]\n"
             "try:\n    runpy.run_module('farm.cli', run_name='__main__')\nfinally:\n"
             "    print('peak-rss-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)",
             str(tmp / "million.json")], env=env, capture_output=True, text=True)
        accepted = time.perf_counter() - started
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.split()[0]
        submit_peak = int(submitted.stderr.split("peak-rss-kb")[1].split()[0]) / 1024

        with embedded.start():
            board = embedded.board
            wait_until(lambda: board.status(job).done > 0, 120, "the first images")
            peak_dispatcher, peak_redis, queued = 0.0, 0, 0
            deadline = time.monotonic() + args.feed_seconds
            while time.monotonic() < deadline:
                peak_dispatcher = max(peak_dispatcher, rss_mb(embedded.dispatcher.pid))
                peak_redis = max(peak_redis, client.info("memory")["used_memory"])
                queued = max(queued, sum(client.llen(k) for k in client.keys(f"{settings.queue}.*")))
                time.sleep(0.2)
            done = board.status(job).done
            subprocess.run([sys.executable, "-m", "farm.cli", "cancel", job], env=env, capture_output=True)
    print(f"1,000,000 items accepted in {accepted:.1f} s (the whole `farm submit` process, Python start included)")
    print(f"submitting process peak RSS: {submit_peak:.0f} MB (target < 300 MB)")
    print(f"dispatcher peak RSS while feeding: {peak_dispatcher:.0f} MB (target < 300 MB)")
    print(f"Redis used memory: {before / 2**20:.1f} MB before, peak {peak_redis / 2**20:.1f} MB while feeding "
          f"(target < 50 MB)")
    print(f"messages in the broker at most: {queued}; images rendered meanwhile: {done}")


if __name__ == "__main__":
    main()
