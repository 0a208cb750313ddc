"""Images per second: the farm (real Redis, the dispatcher, one worker process, local store)
against a plain loop that calls the same diffusers pipeline once per image and saves PNGs.

Both sides render the same items (prompts, seeds, size, steps, sampler) with the same
model, warm, in the same run. Prints both throughputs and their ratio.

    python -m bench.throughput --images 32 --size 64 --steps 20 --batch-size 8
    python -m bench.throughput --images 16 --size 256 --steps 20 --batch-size 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dispatcher.follow import follow
from dispatcher.submit import submit
from farm import manifest
from farm.embedded import EmbeddedFarm
from farm.plan import Plan
from farm.settings import Settings
from farm.spec import parse_spec
from farm.store import LocalStore


def make_spec(images: int, size: int, steps: int, batch_size: int, seed_start: int = 1):
    return parse_spec({"prompts": ["a red circle", "a blue square"],
                       "seeds": {"start": seed_start, "count": max(1, images // 2)},
                       "width": size, "height": size, "steps": steps, "sampler": "Euler a", "batch_size": batch_size})


@dataclass(frozen=True)
class Timing:
    images: int
    #: Wall-clock seconds for all the images.
    seconds: float
    #: Of those, seconds spent inside the pipeline calls.
    render_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds


@contextmanager
def plain_loop(spec, cache_dir: Path, out: Path):
    """Yields run(): one pass over the spec's items, one pipeline call and one PNG per image.
    The model is loaded and warm before the first run."""
    import torch

    from farm import __version__, infotext, png
    from workers.models import ModelCache
    from workers.render import txt2img

    model = ModelCache(cache_dir, torch.device("cpu"), torch.float32).get("tiny-sd")
    plan = Plan(spec, "loop")
    items = [plan.item(i) for i in range(plan.item_count)]
    txt2img(model, items[:1])  # warm up

    def run() -> Timing:
        started = time.perf_counter()
        rendering = 0.0
        for item in items:
            before = time.perf_counter()
            image = txt2img(model, [item])[0]
            rendering += time.perf_counter() - before
            text = infotext.for_item(item, model_name=model.name, model_hash=model.hash, version=f"farm {__version__}")
            (out / f"{item.index:06d}.png").write_bytes(png.encode(image, text))
        return Timing(plan.item_count, time.perf_counter() - started, rendering)

    yield run


@contextmanager
def through_farm(spec, cache_dir: Path, out: Path, cpu_threads: int | None = None):
    """Yields run(): the spec submitted as one job to a running farm (Redis, the dispatcher, one
    worker process, a local store), timed to the worker's stamp of the last item. The render
    seconds are the worker's own, from the records."""
    settings = Settings.from_env().with_overrides(store=str(out / "store"), cache_dir=cache_dir, device="cpu",
                                                  cpu_threads=cpu_threads)
    with EmbeddedFarm(settings, out, name="bench") as embedded:
        settings, board = embedded.settings, embedded.board
        warm = make_spec(1, spec.width, spec.steps, 1, seed_start=10_000)
        follow(board, submit(warm, settings).job_id)  # loads the model in the worker

        def run() -> Timing:
            started = time.time()
            job = submit(spec, settings)
            status = follow(board, job.job_id, interval=0.1)
            # The worker stamps the moment the last item is counted, so polling adds nothing.
            assert status.done == job.items, status
            rows = manifest.read_records(LocalStore(settings.store), job.job_id)
            return Timing(job.items, status.completed - started, sum(r["seconds"] for r in rows))

        yield run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=1, help="the farm's batch size (the loop always uses 1)")
    args = parser.parse_args()
    from workers.tiny import TINY_SD, builtin_model_dir

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        builtin_model_dir(TINY_SD, cache)
        spec = make_spec(args.images, args.size, args.steps, args.batch_size)
        (tmp / "loop").mkdir()
        with plain_loop(spec, cache, tmp / "loop") as run:
            loop = run().images_per_second
        with through_farm(spec, cache, tmp) as run:
            farm = run().images_per_second
    print(f"{spec.item_count} images, {args.size}x{args.size}, {args.steps} steps, farm batch size {args.batch_size}")
    print(f"plain loop: {loop:8.2f} images/s")
    print(f"farm:       {farm:8.2f} images/s")
    print(f"ratio farm/loop: {farm / loop:.2f}x")


if __name__ == "__main__":
    main()
