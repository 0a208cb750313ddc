"""The pool's two sharing figures, with real Redis, the dispatcher and real CPU workers:

- fair share: user ann submits 2,000 images, user bob 50 images 5 s later, one worker.
  Printed: how much of ann's job was done when bob's finished (the target: under 10%).
- model affinity: one job of 60 images over 3 models on 2 workers. Printed: model loads
  (the target: at most 4; 3 is the least possible).

    python -m bench.pool
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from dispatcher import control
from dispatcher.follow import follow
from dispatcher.submit import submit
from farm import pool
from farm.embedded import EmbeddedFarm, wait_until
from farm.settings import Settings
from farm.spec import parse_spec


def spec(items: int, **extra):
    return parse_spec({"prompts": ["a red circle"], "seeds": {"start": 1, "count": items}, "width": 64,
                       "height": 64, "steps": 4, "batch_size": 4, **extra})


def farm(tmp: Path, workers: int) -> EmbeddedFarm:
    settings = Settings.from_env().with_overrides(store=str(tmp / "store"), cache_dir=tmp / "cache", device="cpu",
                                                  cpu_threads=1)
    return EmbeddedFarm(settings, tmp / f"farm-{workers}", workers=workers, name="bench")


def fair_share(tmp: Path) -> float:
    with farm(tmp, 1) as embedded:
        settings, board = embedded.settings, embedded.board
        big = submit(spec(2000), settings, user="ann").job_id
        wait_until(lambda: board.status(big).done > 0, 120, "ann's job to start")
        time.sleep(5)
        small = submit(spec(50), settings, user="bob").job_id
        follow(board, small, interval=0.05)
        fraction = board.status(big).done / 2000
        control.cancel(board, None, big)
        return fraction


def affinity(tmp: Path) -> tuple[int, int]:
    from workers.tiny import TINY_SD, builtin_model_dir

    source = builtin_model_dir(TINY_SD, tmp / "cache")
    models = [str(shutil.copytree(source, tmp / name)) for name in ("alpha", "beta", "gamma")]
    with farm(tmp, 2) as embedded:
        board = embedded.board
        job = submit(spec(20, batch_size=2, grid={"model": models}), embedded.settings).job_id
        status = follow(board, job, interval=0.1)
        return status.done, sum(w.loads for w in pool.read(board.redis, embedded.settings.queue))


def main() -> None:
    from workers.tiny import TINY_SD, builtin_model_dir

    with tempfile.TemporaryDirectory(prefix="farm-bench-") as tmp:
        tmp = Path(tmp)
        builtin_model_dir(TINY_SD, tmp / "cache")
        fraction = fair_share(tmp)
        print(f"fair share: ann's 2000-image job was {100 * fraction:.1f}% done when bob's 50 images finished "
              f"(target < 10%)")
        images, loads = affinity(tmp)
        print(f"model affinity: {images} images over 3 models on 2 workers, {loads} model loads (target <= 4)")


if __name__ == "__main__":
    main()
