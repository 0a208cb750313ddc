"""`farm export`: each format loaded back with the real libraries (`datasets`, `webdataset`,
`pyarrow`), every row checked against the job and every image decoded; failed items listed with
their reason, never as rows; the same bytes on a second run and after a killed run resumes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bench.export import make_job
from farm import export, infotext, png
from farm.store import LocalStore
from farm.stored import StoredJob
from tests.conftest import run_farm

JOB = "sweep-20261203-120000-abcdef"
FAILED, MISSING = (5, 6), (13,)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> LocalStore:
    store = LocalStore(tmp_path_factory.mktemp("source"))
    make_job(store, JOB, 24, failed=FAILED, missing=MISSING)
    return store


def _expected(source: LocalStore) -> dict[int, dict]:
    """What each exported row must say, read from the stored PNGs themselves."""
    job = StoredJob(source, JOB)
    rows = {}
    for index in range(job.total):
        if index in FAILED or index in MISSING:
            continue
        item = job.plan.item(index)
        data = source.get(f"{JOB}/images/{index:06d}-{item.seed}.png")
        rows[index] = {"item": item, "sha256": hashlib.sha256(data).hexdigest(), "pixels": Image.open(io.BytesIO(data)).tobytes(),
                       "parameters": png.read_parameters(data)}
    return rows


def _check_row(row: dict, expected: dict, image: Image.Image) -> None:
    item = expected["item"]
    assert (row["index"], row["prompt"], row["seed"], row["steps"], row["sampler"]) == \
        (item.index, item.prompt, item.seed, item.steps, item.sampler)
    assert isinstance(row["seed"], int) and isinstance(row["steps"], int) and isinstance(row["cfg_scale"], float)
    assert row["cfg_scale"] == item.cfg_scale and row["model"] == "shapes-sd" and row["model_hash"] == "0123456789"
    assert row["parameters"] == expected["parameters"]
    assert infotext.parse(row["parameters"])["Seed"] == str(item.seed)
    assert row["sha256"] == expected["sha256"]
    assert image.convert("RGB").tobytes() == expected["pixels"]


def _failed(dest: Path) -> list[dict]:
    return [json.loads(line) for line in (dest / "failed.jsonl").read_text().splitlines()]


def test_imagefolder_loads_in_datasets_with_typed_columns(source, tmp_path):
    import datasets

    report = export.export(StoredJob(source, JOB), LocalStore(tmp_path), "imagefolder")
    assert (report.exported, report.failed, report.missing) == (21, 2, 1)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    expected = _expected(source)
    assert sorted(loaded["index"]) == sorted(expected)
    assert loaded.features["seed"].dtype == "int64" and loaded.features["cfg_scale"].dtype == "float64"
    for row in loaded:
        _check_row(row, expected[row["index"]], row["image"])
        assert row["text"] == row["prompt"]
    assert [(f["index"], f["reason"]) for f in _failed(tmp_path)] == [(i, "out of memory at batch size 1") for i in FAILED]


def test_webdataset_shards_read_back_sample_by_sample(source, tmp_path):
    import webdataset as wds

    report = export.export(StoredJob(source, JOB), LocalStore(tmp_path), "webdataset", shard_size=8)
    assert report.written == [f"{JOB}-{n:06d}.tar" for n in range(3)]
    expected = _expected(source)
    urls = str(tmp_path / f"{JOB}-{{000000..000002}}.tar")
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [int(s["__key__"]) for s in samples] == sorted(expected)
    for sample in samples:
        assert "." not in sample["__key__"]
        row = sample["json"]
        _check_row(row, expected[row["index"]], sample["png"])
        assert sample["txt"] == row["prompt"]


def test_parquet_reads_in_pyarrow_and_datasets_with_the_images(source, tmp_path):
    import datasets
    import pyarrow.parquet as pq

    export.export(StoredJob(source, JOB), LocalStore(tmp_path), "parquet", shard_size=10)
    files = sorted(tmp_path.glob("*.parquet"))
    assert [f.name for f in files] == [f"{JOB}-{n:06d}.parquet" for n in range(3)]
    table = pq.read_table(files[0])
    assert table.schema.field("image").type.names == ["bytes", "path"]
    assert table.schema.field("seed").type == "int64"
    expected = _expected(source)
    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train")
    assert loaded["index"] == sorted(expected)
    for row in loaded:
        _check_row(row, expected[row["index"]], row["image"])


def test_exporting_again_writes_the_same_bytes(source, tmp_path):
    for fmt in ("webdataset", "parquet"):
        first, second = tmp_path / f"{fmt}-1", tmp_path / f"{fmt}-2"
        for dest in (first, second):
            export.export(StoredJob(source, JOB), LocalStore(dest), fmt, shard_size=8)
        assert _tree(first) == _tree(second)


def test_shard_bytes_cut_shards_by_size_and_sizes_are_read_with_units(source, tmp_path):
    one_image = len(source.get(f"{JOB}/images/000000-1.png"))
    report = export.export(StoredJob(source, JOB), LocalStore(tmp_path), "webdataset",
                           shard_bytes=one_image * 5)
    assert len(report.written) == 5  # 21 images, a new shard once 5 images' bytes are in
    assert export.parse_size("500MB") == 500_000_000 and export.parse_size("2GiB") == 2 * 2**30
    with pytest.raises(ValueError, match="shard bytes"):
        export.parse_size("lots")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_killed_export_resumes_to_the_same_bytes(tmp_path):
    store = LocalStore(tmp_path / "source")
    make_job(store, JOB, 1600, failed=(7,))
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    export.export(StoredJob(store, JOB), LocalStore(whole), "webdataset", shard_size=100)
    command = [sys.executable, "-m", "farm.cli", "export", JOB, str(resumed), "--format", "webdataset",
               "--shard-size", "100", "--store", str(store.root)]
    env = {**os.environ, "FARM_BROKER_URL": ""}
    killed = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = resumed / export.MARKERS
    deadline = time.monotonic() + 120
    while len(list(markers.glob("*.json"))) < 3 and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    finished = len(list(markers.glob("*.json")))
    assert 3 <= finished < 16, finished  # killed part way, with shards still to write
    result = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{finished} already there" in result.stdout
    assert _tree(resumed) == _tree(whole)


def test_the_cli_says_what_is_missing_from_a_job_still_running(source, tmp_path):
    result = run_farm("export", JOB, str(tmp_path / "out"), "--format", "imagefolder", "--store", str(source.root),
                      env={"FARM_BROKER_URL": ""})
    assert result.returncode == 0, result.stderr
    assert "exported 21 of 24 images" in result.stdout
    assert "1 images are not rendered yet" in result.stdout and "2 items failed" in result.stdout
    refused = run_farm("export", JOB, str(tmp_path / "out"), "--format", "zip", "--store", str(source.root),
                       env={"FARM_BROKER_URL": ""})
    assert refused.returncode == 2 and "format: must be one of imagefolder, webdataset, parquet" in refused.stderr


@pytest.mark.e2e
def test_a_rendered_job_exports_to_s3_and_every_row_matches_its_manifest(farm_settings, workers_factory, s3_server,
                                                                        bucket, tmp_path):
    import datasets
    import webdataset as wds

    from dispatcher.submit import submit
    from farm.jobs import JobBoard, JobState
    from farm.spec import parse_spec
    from tests.conftest import wait_job

    workers_factory(farm_settings).start(1)
    spec = parse_spec({"prompts": ["a red circle", "a (blue:1.2) square"], "seeds": [1, 2, 3], "steps": 3,
                       "width": 64, "height": 64, "batch_size": 3, "grid": {"cfg_scale": [4.0, 7.5]}})
    job_id = submit(spec, farm_settings).job_id
    assert wait_job(JobBoard.from_url(farm_settings.broker_url), job_id).state is JobState.DONE
    client = s3_server.client()
    manifest = {row["index"]: row for row in map(json.loads, client.get_object(
        Bucket=bucket, Key=f"renders/{job_id}/manifest.jsonl")["Body"].read().decode().splitlines())}
    env = farm_settings.to_env()
    for fmt in ("imagefolder", "webdataset", "parquet"):
        result = run_farm("export", job_id, f"s3://{bucket}/datasets/{fmt}", "--format", fmt, "--shard-size", "5",
                          env=env)
        assert result.returncode == 0, result.stderr
        assert "exported 12 of 12 images" in result.stdout
        local = tmp_path / fmt
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"datasets/{fmt}/"):
            for obj in page["Contents"]:
                path = local / obj["Key"].removeprefix(f"datasets/{fmt}/")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read())
        if fmt == "imagefolder":
            rows = [(r, r["image"]) for r in datasets.load_dataset("imagefolder", data_dir=str(local), split="train")]
        elif fmt == "webdataset":
            rows = [(s["json"], s["png"]) for s in wds.WebDataset(sorted(str(p) for p in local.glob("*.tar")),
                                                                   shardshuffle=False).decode("pil")]
        else:
            rows = [(r, r["image"]) for r in datasets.load_dataset("parquet", data_files=str(local / "*.parquet"),
                                                                   split="train")]
        assert sorted(r["index"] for r, _ in rows) == sorted(manifest)
        for row, image in rows:
            expected = manifest[row["index"]]
            for column in ("prompt", "seed", "steps", "cfg_scale", "sampler", "model", "model_hash", "sha256"):
                assert row[column] == expected[column], (fmt, column)
            stored = client.get_object(Bucket=bucket, Key=f"renders/{expected['key']}")["Body"].read()
            assert image.convert("RGB").tobytes() == Image.open(io.BytesIO(stored)).convert("RGB").tobytes()
        assert (local / "failed.jsonl").read_text() == ""


def test_an_export_table_is_checked_with_the_spec(tmp_path):
    from farm.errors import SpecError
    from farm.spec import parse_spec

    spec = parse_spec({"prompts": ["x"], "export": {"format": "parquet", "dest": "out/ds", "shard_bytes": "1GB"}},
                      base_dir=tmp_path)
    assert spec.export.dest == str(tmp_path / "out" / "ds") and spec.export.shard_size == 10_000
    for table, field in (({"format": "zip", "dest": "x"}, "export.format"), ({"format": "parquet"}, "export.dest"),
                         ({"format": "parquet", "dest": "x", "shard_bytes": "huge"}, "export.shard_bytes"),
                         ({"format": "parquet", "dest": "x", "shard_size": 0}, "export.shard_size")):
        with pytest.raises(SpecError) as refused:
            parse_spec({"prompts": ["x"], "export": table})
        assert [f for f, _ in refused.value.problems] == [field]


@pytest.mark.e2e
def test_the_dispatcher_exports_a_job_that_asks_for_it_when_it_ends(farm_settings, workers_factory, s3_server,
                                                                    bucket):
    from dispatcher.submit import submit
    from farm.embedded import wait_until
    from farm.jobs import JobBoard, JobState
    from farm.spec import parse_spec
    from tests.conftest import wait_job

    workers_factory(farm_settings).start(1)
    spec = parse_spec({"prompts": ["a red circle"], "seeds": [1, 2, 3], "steps": 2, "width": 64, "height": 64,
                       "export": {"format": "webdataset", "dest": f"s3://{bucket}/nightly", "shard_size": 2}})
    board = JobBoard.from_url(farm_settings.broker_url)
    job_id = submit(spec, farm_settings).job_id
    assert wait_job(board, job_id).state is JobState.DONE
    state = wait_until(lambda: (s := board.header(job_id).export_state) not in ("", "queued", "running") and s, 60,
                       "the export")
    assert state == f"done: 3 images to s3://{bucket}/nightly as webdataset"
    listed = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="nightly/")["Contents"]}
    assert {f"nightly/{job_id}-000000.tar", f"nightly/{job_id}-000001.tar", "nightly/failed.jsonl"} <= listed
    assert board.status(job_id).summary()["export"] == state
