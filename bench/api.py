"""The webui API under a burst: 200 concurrent `POST /sdapi/v1/txt2img` calls of one image each,
from a real HTTP client against `farm serve` (uvicorn) and one worker, against `farm submit` of
the same 200 items as one job on the same farm, in the same run.

Printed: how many calls were answered with a valid PNG, p50/p99 latency, and seconds per image
both ways, with their ratio.

    python -m bench.api [--calls 200] [--steps 20]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from dispatcher.follow import follow
from dispatcher.submit import submit
from farm.embedded import EmbeddedFarm, free_port, wait_until
from farm.settings import Settings
from farm.spec import parse_spec


def _call(seed: int, steps: int) -> dict:
    return {"prompt": "a red circle on a white background", "seed": seed, "steps": steps, "width": 64,
            "height": 64, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1,
            "override_settings": {"sd_model_checkpoint": "shapes-sd"}}


def _valid_png(answer: httpx.Response) -> bool:
    if answer.status_code != 200:
        return False
    images = answer.json()["images"]
    return len(images) == 1 and Image.open(io.BytesIO(base64.b64decode(images[0]))).size == (64, 64)


async def burst(url: str, calls: int, steps: int) -> tuple[list[float], int, float]:
    """Latencies of every call, how many got a valid PNG, and the wall time of the whole burst."""
    limits = httpx.Limits(max_connections=calls, max_keepalive_connections=calls)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def one(seed: int) -> tuple[float, bool]:
            started = time.perf_counter()
            answer = await client.post("/sdapi/v1/txt2img", json=_call(seed, steps))
            return time.perf_counter() - started, _valid_png(answer)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(1000 + i) for i in range(calls)))
        wall = time.perf_counter() - started
    return [r[0] for r in results], sum(r[1] for r in results), wall


def serve_in_thread(settings: Settings, port: int):
    import uvicorn

    from dispatcher.api import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(settings, auth=False), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(up, 30, "the API server")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        settings = Settings.from_env().with_overrides(store=str(tmp / "store"), cache_dir=tmp / "cache",
                                                      device="cpu", preload=("shapes-sd",))
        with EmbeddedFarm(settings, tmp / "farm", name="bench-api") as farm:
            # Warm: one image through the batch path first, so neither side pays the first load.
            warm = submit(parse_spec({"model": "shapes-sd", "prompts": ["x"], "seeds": [1], "width": 64,
                                      "height": 64, "steps": 2}), farm.settings)
            follow(farm.board, warm.job_id)

            spec = parse_spec({"model": "shapes-sd", "prompts": ["a red circle on a white background"],
                               "seeds": {"start": 1000, "count": args.calls}, "steps": args.steps,
                               "sampler": "Euler a", "width": 64, "height": 64, "batch_size": 1})
            started = time.perf_counter()
            job = submit(spec, farm.settings)
            follow(farm.board, job.job_id, interval=0.1)
            batch_seconds = time.perf_counter() - started

            server = serve_in_thread(farm.settings, free_port())
            latencies, valid, api_seconds = asyncio.run(burst(f"http://127.0.0.1:{server.config.port}",
                                                              args.calls, args.steps))
            server.should_exit = True
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    print(f"{args.calls} concurrent txt2img calls of 1 image (shapes-sd 64x64, {args.steps} steps, Euler a), 1 worker")
    print(f"answered with a valid PNG: {valid}/{args.calls}")
    print(f"latency: p50 {statistics.median(latencies):.1f} s, p99 {p99:.1f} s, max {ordered[-1]:.1f} s")
    print(f"farm submit, one job of the same {args.calls} items: {batch_seconds / args.calls:.3f} s per image "
          f"({batch_seconds:.1f} s)")
    print(f"webui API burst: {api_seconds / args.calls:.3f} s per image ({api_seconds:.1f} s); "
          f"API / submit: {api_seconds / batch_seconds:.2f}x")


if __name__ == "__main__":
    main()
