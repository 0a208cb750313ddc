"""Queue overhead per item: what the farm adds to each image beyond rendering it.

The smallest model (tiny-sd), 64x64, one step, batch size 1, so rendering is as cheap as
it gets and the farm's own cost shows: taking the message, Redis bookkeeping, the PNG
upload to a local store, the record, the feeder's next hand-out. Each round renders the
same items through a plain loop and through the farm (real Redis, dispatcher, one
worker), one right after the other, so both see the same machine; the overhead of a round
is (farm time - loop time) / items. Prints the median over rounds.
Both sides render with one torch thread, as a GPU worker leaves the CPU to the rest;
the other core runs Redis and the dispatcher, as on a real pool.

    python -m bench.overhead --images 40 --rounds 7
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
    args = parser.parse_args()
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
                through_farm(spec, tmp / "cache", tmp, cpu_threads=1) as run_farm:
            for _ in range(args.rounds):
                loop.append(run_loop())
                farm.append(run_farm())
    n = spec.item_count
    per_round = [1000 * (1 / f - 1 / lo) for f, lo in zip(farm, loop)]
    print(f"{n} images a round, {args.rounds} rounds, tiny-sd 64x64, 1 step, batch size 1")
    print(f"plain loop: {1000 / statistics.median(loop):7.2f} ms/image (median of rounds)")
    print(f"farm:       {1000 / statistics.median(farm):7.2f} ms/image (median of rounds)")
    print("overhead per round (ms/image): " + ", ".join(f"{x:.2f}" for x in per_round))
    print(f"queue overhead per item, median: {statistics.median(per_round):.2f} ms")


if __name__ == "__main__":
    main()
