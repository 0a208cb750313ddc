"""Queue overhead per item: what the farm adds to each image beyond rendering it.

The smallest model (tiny-sd), 64x64, one step, batch size 1, so rendering is as cheap as
it gets and the farm's own cost shows: taking the message, Redis bookkeeping, the PNG
upload to a local store, the record, the feeder's next hand-out. Each round renders the
same items through a plain loop and through the farm (real Redis, dispatcher, one
worker), one right after the other. Both sides time their pipeline calls, and the
overhead of a round is the farm's time per item outside its pipeline calls minus the
loop's (which encodes and writes the PNG too), so the render's own jitter on a busy
machine cancels out. Prints the median over rounds, and the plain difference of the
wall-clock times beside it. Both sides render with one torch thread, as a GPU worker
leaves the CPU to the rest; the other core runs Redis and the dispatcher.

    python -m bench.overhead --images 40 --rounds 7
    python -m bench.overhead --amqp amqp://guest:guest@127.0.0.1:5672/%2F   # Redis and RabbitMQ, in one run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.throughput import make_spec, plain_loop, through_farm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--amqp", help="also measure with this RabbitMQ as the broker (the state in Redis)")
    args = parser.parse_args()
    for broker in (None, args.amqp) if args.amqp else (None,):
        measure(args, broker)


def measure(args, broker: str | None) -> None:
    import torch

    from workers.tiny import TINY_SD, builtin_model_dir

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        builtin_model_dir(TINY_SD, tmp / "cache")
        spec = make_spec(args.images, 64, 1, 1)
        (tmp / "loop").mkdir()
        torch.set_num_threads(1)
        loop, farm = [], []
        with plain_loop(spec, tmp / "cache", tmp / "loop") as run_loop, \
                through_farm(spec, tmp / "cache", tmp, cpu_threads=1, broker=broker) as run_farm:
            for _ in range(args.rounds):
                loop.append(run_loop())
                farm.append(run_farm())
    n = spec.item_count
    outside = lambda t: 1000 * (t.seconds - t.render_seconds) / t.images  # noqa: E731
    per_round = [outside(f) - outside(lo) for f, lo in zip(farm, loop)]
    wall = [1000 * (f.seconds - lo.seconds) / n for f, lo in zip(farm, loop)]
    ms = lambda ts, key: statistics.median(1000 * key(t) / t.images for t in ts)  # noqa: E731
    print(f"broker: {'RabbitMQ' if broker else 'Redis'}; {n} images a round, {args.rounds} rounds, tiny-sd 64x64, "
          "1 step, batch size 1")
    print(f"plain loop: {ms(loop, lambda t: t.seconds):6.2f} ms/image, of which rendering "
          f"{ms(loop, lambda t: t.render_seconds):6.2f} (medians of rounds)")
    print(f"farm:       {ms(farm, lambda t: t.seconds):6.2f} ms/image, of which rendering "
          f"{ms(farm, lambda t: t.render_seconds):6.2f}")
    print("overhead per round (ms/image, outside the pipeline calls): " + ", ".join(f"{x:.2f}" for x in per_round))
    print("plain wall-clock difference per round (ms/image):        " + ", ".join(f"{x:.2f}" for x in wall))
    print(f"queue overhead per item, median: {statistics.median(per_round):.2f} ms "
          f"(wall-clock difference: {statistics.median(wall):.2f} ms)")


if __name__ == "__main__":
    main()
