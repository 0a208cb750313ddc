"""`farm export` against a plain boto3 copy loop, on the same S3 server, in one run.

    python -m bench.export [--images 10000] [--format webdataset]

The bench makes its own job: small PNGs (64x64, seeded noise, each with its infotext) written
straight into a bucket of a private SeaweedFS, no rendering. Then, on the same objects:
- baseline: a plain loop that GETs each image and PUTs it under another prefix with boto3;
- farm: `farm.export.export` of the job to `s3://.../export`, in the chosen format.
It prints images per second for both and their ratio, and the exporter's peak memory (RSS
of a child process that runs only the export) at 1,000 and at `--images` images.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from farm import infotext, keys, png
from farm.plan import Plan
from farm.spec import parse_spec
from farm.store import Store


def make_job(store: Store, job_id: str, count: int, failed: tuple[int, ...] = (), missing: tuple[int, ...] = (),
             side: int = 64) -> Plan:
    """A job of `count` items as workers would have stored it, without rendering: job.json, a
    PNG with its infotext per item (seeded noise), failure records for `failed`; `missing`
    items have neither (still to render)."""
    prompts = [f"a {colour} circle on a white background" for colour in ("red", "blue", "green", "purple")]
    spec = parse_spec({"model": "shapes-sd", "prompts": prompts, "seeds": {"start": 1, "count": -(-count // 4)},
                       "steps": 20, "width": side, "height": side, "batch_size": 8})
    plan = Plan(spec, job_id)
    job = {"job_id": job_id, "user": "bench", "created": 1_764_000_000.0, "items": plan.item_count,
           "chunks": plan.chunk_count, "spec": spec.to_json_dict()}
    store.put(keys.job_json(job_id), json.dumps(job).encode(), "application/json")
    rng = np.random.default_rng(7)
    for index in range(count):
        item = plan.item(index)
        if index in missing:
            continue
        if index in failed:
            row = {"index": index, "seed": item.seed, "prompt": item.prompt, "reason": "out of memory at batch size 1"}
            store.put(keys.failure_record(job_id, index), json.dumps(row).encode(), "application/json")
            continue
        picture = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
        text = infotext.for_item(item, model_name="shapes-sd", model_hash="0123456789", version="farm bench")
        store.put(keys.image(job_id, index, item.seed), png.encode(picture, text), "image/png")
    return plan


def plain_copy(client, bucket: str, source_prefix: str, dest_prefix: str) -> int:
    """The baseline: list, then GET and PUT each image, one after another."""
    count = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=source_prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            client.put_object(Bucket=bucket, Key=dest_prefix + obj["Key"].rsplit("/", 1)[-1], Body=body)
            count += 1
    return count


def _export_peak(env: dict, source: str, job_id: str, dest: str, fmt: str, queue) -> None:
    import os

    os.environ.update(env)
    from farm import export
    from farm.store import open_store
    from farm.stored import StoredJob

    started = time.perf_counter()
    report = export.export(StoredJob(open_store(source), job_id), open_store(dest), fmt)
    queue.put((report.exported, time.perf_counter() - started,
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def run_export(env: dict, source: str, job_id: str, dest: str, fmt: str) -> tuple[int, float, float]:
    """(images, seconds, peak RSS in MB) of an export in a fresh process."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_export_peak, args=(env, source, job_id, dest, fmt, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def main() -> None:
    from tests.conftest import S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedS3
    from farm.store import open_store
    import os

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--format", default="webdataset", choices=("imagefolder", "webdataset", "parquet"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="farm-bench-export-") as tmp:
        server = SeaweedS3(Path(tmp)).start()
        try:
            env = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": server.endpoint}
            os.environ.update(env)
            client = server.client()
            client.create_bucket(Bucket="bench")
            figures = {}
            for count in sorted({1000, args.images}):
                job_id = f"bench-{count}"
                print(f"writing a {count}-image job into the bucket ...", flush=True)
                make_job(open_store("s3://bench/jobs"), job_id, count)
                started = time.perf_counter()
                copied = plain_copy(client, "bench", f"jobs/{job_id}/images/", f"copy/{job_id}/")
                plain = time.perf_counter() - started
                exported, seconds, peak = run_export(env, "s3://bench/jobs", job_id, f"s3://bench/export-{count}",
                                                     args.format)
                figures[count] = (copied / plain, exported / seconds, peak)
                print(f"{count} images: plain boto3 copy {copied / plain:.0f} img/s, farm export ({args.format}) "
                      f"{exported / seconds:.0f} img/s, ratio {plain / seconds * exported / copied:.2f}x, "
                      f"exporter peak RSS {peak:.0f} MB", flush=True)
            small, large = figures[1000][2], figures[max(figures)][2]
            print(f"peak RSS: {small:.0f} MB at 1,000 images, {large:.0f} MB at {max(figures):,} "
                  f"({large / small:.2f}x)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
