"""Images per second: the farm against what a user writes instead, measured in one run.

Default: whole processes, start-up and model loading included on every side, the same
images (4 prompts x N/4 seeds, 64 px, 20 steps, Euler a, shapes-sd, batches of 8):
- the stock diffusers script, one image per call (bench/stock_script.py, batch size 1);
- the stock script in batches of 8 with per-image generators (the one who knows better);
- `farm run` (a private Redis, the dispatcher, one worker process, outputs in a folder);
- with `--amqp URL`, `farm run --amqp URL` too (RabbitMQ the broker, the state in the private Redis).
Every farm image is compared with the batched script's, pixel for pixel.

    python -m bench.throughput --images 48 192

`--warm`: the farm (real Redis, the dispatcher, one worker process, local store) against
the farm's own render function in a loop, both with the model loaded and warm:

    python -m bench.throughput --warm --images 32 --size 64 --steps 20 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dispatcher.follow import follow
from dispatcher.submit import submit
from farm import manifest
from farm.embedded import EmbeddedFarm
from farm.plan import Plan
from farm.settings import Settings
from farm.spec import parse_spec
from farm.store import LocalStore

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on a white background", "a blue square on a yellow background",
           "a green triangle on a black background", "an orange circle and a purple triangle on a gray background"]


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
def through_farm(spec, cache_dir: Path, out: Path, cpu_threads: int | None = None, broker: str | None = None):
    """Yields run(): the spec submitted as one job to a running farm (Redis, the dispatcher, one
    worker process, a local store), timed to the worker's stamp of the last item. The render
    seconds are the worker's own, from the records. `broker`: an AMQP URL instead of the farm's Redis."""
    settings = Settings.from_env().with_overrides(store=str(out / "store"), cache_dir=cache_dir, device="cpu",
                                                  cpu_threads=cpu_threads)
    with EmbeddedFarm(settings, out, name="bench", broker=broker) as embedded:
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


# --- whole processes: the farm against the stock diffusers scripts ----------------------------


def _timed(cmd: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "wb") as out:
        result = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({result.returncode}); see {log}")
    return seconds


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def whole_processes(images: int, tmp: Path, batch_size: int = 8, steps: int = 20,
                    rounds: int = 3, amqp: str | None = None) -> dict[str, float]:
    """Median seconds for each side to make the same `images` images from a cold start, over
    `rounds` rounds (the sides take turns going first), and whether every farm image equals the
    batched script's, pixel for pixel. With `amqp`, `farm run --amqp` is one more side."""
    from workers import shapes

    seeds = images // len(PROMPTS)
    work = tmp / f"n{images}"
    work.mkdir()
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (work / "job.toml").write_text(
        f'model = "shapes-sd"\nprompts_file = "prompts.txt"\nseeds = {{ start = 1, count = {seeds} }}\n'
        f'steps = {steps}\nsampler = "Euler a"\nwidth = 64\nheight = 64\nbatch_size = {batch_size}\n')
    stock = [sys.executable, "-m", "bench.stock_script", str(shapes.MODEL_DIR)]
    common = ["--prompts-file", str(work / "prompts.txt"), "--seeds", "1", str(seeds), "--steps", str(steps)]
    sides = {
        "stock, one per call": lambda out: [*stock, str(out), *common, "--batch-size", "1"],
        f"stock, batches of {batch_size}": lambda out: [*stock, str(out), *common, "--batch-size", str(batch_size)],
        "farm run": lambda out: [sys.executable, "-m", "farm.cli", "run", str(work / "job.toml"), "--out", str(out),
                                 "--gpus", "none"],
    }
    if amqp:
        sides["farm run, RabbitMQ"] = lambda out: [*sides["farm run"](out), "--amqp", amqp]
    names = list(sides)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out = work / f"{names.index(name)}-{r}"
            times[name].append(_timed(sides[name](out), out.with_suffix(".log")))
    batched = sorted((work / "1-0").glob("*.png"))
    result = {name: statistics.median(values) for name, values in times.items()}
    same = True
    for name in (n for n in names if n.startswith("farm run")):
        [job_dir] = [d for d in (work / f"{names.index(name)}-0").iterdir() if d.is_dir()]
        farm_images = sorted((job_dir / "images").glob("*.png"))
        assert len(farm_images) == len(batched) == images, (name, len(farm_images), len(batched))
        same &= all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(farm_images, batched))
    result["identical"] = float(same)
    for name, values in times.items():
        print(f"  {images} images, {name}: " + ", ".join(f"{v:.1f} s" for v in values), flush=True)
    return result


def print_whole(results: dict[int, dict[str, float]]) -> None:
    sides = [k for k in next(iter(results.values())) if k != "identical"]
    print(f"{'images':>6}  " + "  ".join(f"{side:>22}" for side in sides) + "  same pixels as batched")
    for images, times in results.items():
        cells = "  ".join(f"{times[s]:8.1f} s {images / times[s]:6.2f}/s" for s in sides)
        print(f"{images:>6}  {cells}  {'yes' if times['identical'] else 'NO'}")
        naive, batched = times[sides[0]], times[sides[1]]
        for farm in (s for s in sides if s.startswith("farm run")):
            print(f"{'':>8}{farm}: {naive / times[farm]:.2f}x the one-per-call script, "
                  f"{batched / times[farm]:.2f}x the batched one")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="the warm comparison with the farm's own render loop")
    parser.add_argument("--images", type=int, nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=3, help="whole processes: rounds, medians reported")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the farm's batch size [warm: 1 (the loop always uses 1); whole: 8, the script's too]")
    parser.add_argument("--amqp", help="also through the farm with this RabbitMQ as the broker (amqp://...)")
    args = parser.parse_args()
    if not args.warm:
        with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
            results = {n: whole_processes(n, Path(tmp), args.batch_size or 8, args.steps, args.rounds, args.amqp)
                       for n in args.images or [48, 192]}
        print(f"whole processes, start-up and model load included; shapes-sd 64x64, {args.steps} steps, Euler a; "
              f"medians of {args.rounds} rounds")
        print_whole(results)
        return
    warm(args.images[0] if args.images else 32, args.size, args.steps, args.batch_size or 1, args.amqp)


def warm(images: int, size: int, steps: int, batch_size: int, amqp: str | None = None) -> None:
    from workers.tiny import TINY_SD, builtin_model_dir

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        builtin_model_dir(TINY_SD, cache)
        spec = make_spec(images, size, steps, batch_size)
        (tmp / "loop").mkdir()
        with plain_loop(spec, cache, tmp / "loop") as run:
            loop = run().images_per_second
        farms = {}
        for broker in (None, amqp) if amqp else (None,):
            with through_farm(spec, cache, tmp / ("amqp" if broker else "redis"), broker=broker) as run:
                farms["RabbitMQ" if broker else "Redis"] = run().images_per_second
    print(f"{spec.item_count} images, {size}x{size}, {steps} steps, farm batch size {batch_size}")
    print(f"plain loop: {loop:8.2f} images/s")
    for name, farm in farms.items():
        print(f"farm ({name} broker): {farm:8.2f} images/s, ratio farm/loop: {farm / loop:.2f}x")


if __name__ == "__main__":
    main()
