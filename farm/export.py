"""`farm export`: a job's images as a dataset that training tools load as they are.

- **imagefolder**, as Hugging Face `datasets` reads it: `DEST/train/<index>-<seed>.png` with
  `DEST/train/metadata.jsonl` beside them, one row per image: `file_name`, `text` (the prompt)
  and every generation parameter as its own column (COLUMNS), the infotext as `parameters`.
- **webdataset**: tar shards `DEST/<job>-000000.tar`, ...; each sample's key is the item's
  zero-padded index, with members `.png`, `.txt` (the prompt) and `.json` (the row).
- **parquet**: `DEST/<job>-000000.parquet`, ...: the row's columns and the PNG in an `image`
  struct `{bytes, path}`, as `datasets` writes images (its features are in the file's metadata).

Streaming: the job's stored images are listed into a bitmap (one bit per item), then read in
index order a few at a time and written as they come, so memory does not grow with the job;
a shard is built in a temporary file and uploaded whole. Items that failed are listed in
`DEST/failed.jsonl` with their reason, never as rows without an image. The order is the items'
and every byte is a function of the job, so exporting again rewrites the same files; with
`resume`, the shards a previous run finished (each marked in `DEST/.farm-export/` once
uploaded) are skipped, and so are images already in an imagefolder.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from farm import infotext, keys, png
from farm.plan import Item
from farm.store import Store
from farm.stored import WINDOW, Bitmap, StoredJob, index_of

FORMATS: tuple[str, ...] = ("imagefolder", "webdataset", "parquet")
DEFAULT_SHARD_SIZE = 10_000
#: Rows per Parquet row group.
ROW_GROUP = 256
MARKERS = ".farm-export"

#: The columns of every exported row and their Arrow types, in order; None where one does not
#: apply to the item (no denoising strength in txt2img).
COLUMNS = (
    ("index", "int64"), ("job_id", "string"), ("prompt", "string"), ("negative_prompt", "string"),
    ("seed", "int64"), ("sampler", "string"), ("schedule_type", "string"), ("steps", "int64"),
    ("cfg_scale", "float64"), ("width", "int64"), ("height", "int64"), ("model", "string"),
    ("model_hash", "string"), ("vae", "string"), ("vae_hash", "string"), ("mode", "string"),
    ("denoising_strength", "float64"), ("clip_skip", "int64"), ("emphasis", "string"),
    ("hires_upscaler", "string"), ("hires_scale", "float64"), ("hires_steps", "int64"),
    ("hires_denoising_strength", "float64"), ("variation_seed", "int64"), ("variation_strength", "float64"),
    ("init_image", "string"), ("mask", "string"), ("mask_blur", "int64"), ("masked_content", "string"),
    ("resize_mode", "int64"), ("lora_hashes", "string"), ("ti_hashes", "string"), ("sha256", "string"),
    ("parameters", "string"),
)


def columns(job_id: str, item: Item, data: bytes) -> dict:
    """One image's row: the item's parameters, and what only the drawing knew (model name and
    hash, LoRA and embedding hashes) from the PNG's own infotext."""
    parameters = png.read_parameters(data) or ""
    said = infotext.parse(parameters) if parameters else {}
    hires, image_mode = item.hires, item.mode != "txt2img"
    return {
        "index": item.index, "job_id": job_id, "prompt": item.prompt, "negative_prompt": item.negative_prompt,
        "seed": item.seed, "sampler": item.sampler, "schedule_type": item.schedule_type, "steps": item.steps,
        "cfg_scale": float(item.cfg_scale), "width": item.width, "height": item.height,
        "model": said.get("Model", item.model), "model_hash": said.get("Model hash"), "vae": said.get("VAE"),
        "vae_hash": said.get("VAE hash"), "mode": item.mode,
        "denoising_strength": float(item.denoising_strength) if item.denoising_strength is not None else None,
        "clip_skip": item.clip_skip, "emphasis": item.emphasis,
        "hires_upscaler": hires.upscaler if hires else None, "hires_scale": float(hires.scale) if hires else None,
        "hires_steps": hires.steps if hires else None,
        "hires_denoising_strength": float(hires.denoising_strength) if hires else None,
        "variation_seed": item.variation_seed, "variation_strength": float(item.variation_strength),
        "init_image": item.init_image if image_mode else None, "mask": item.mask,
        "mask_blur": item.mask_blur if item.mode == "inpaint" else None, "masked_content": item.masked_content,
        "resize_mode": item.resize_mode if image_mode else None,
        "lora_hashes": said.get("Lora hashes"), "ti_hashes": said.get("TI hashes"),
        "sha256": hashlib.sha256(data).hexdigest(), "parameters": parameters,
    }


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str) -> int:
    """`500MB`, `1GB`, `4096` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"shard bytes: must be a size such as 500MB or 1GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _rows(job: StoredJob, start: int = 0) -> Iterator[tuple[Item, bytes, dict]]:
    """Every stored image from item `start` on, in index order, with its row."""
    return job.images(job.done.from_(start), lambda item, data: (item, data, columns(job.job_id, item, data)))


class _Writes:
    """Puts to the destination, a bounded number at once; errors surface at the next call."""

    def __init__(self, dest: Store, window: int = WINDOW):
        self.dest = dest
        self.pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix="farm-export-write")
        self.window = window
        self.pending: deque[Future] = deque()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.pending.append(self.pool.submit(self.dest.put, key, data, content_type))
        while len(self.pending) >= self.window:
            self.pending.popleft().result()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class ExportReport:
    format: str
    dest: str
    total: int
    exported: int = 0
    failed: int = 0
    missing: int = 0
    #: Shards (or, for imagefolder, the metadata file) written by this run, and those a resumed
    #: run found finished and skipped.
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


Progress = Callable[[int], None]


def export(job: StoredJob, dest: Store, fmt: str, *, shard_size: int = DEFAULT_SHARD_SIZE,
           shard_bytes: int | None = None, resume: bool = False,
           on_row: Progress | None = None) -> ExportReport:
    """Write the job's stored images to `dest` in `fmt`; `on_row(n)` after each of them."""
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shard_size < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ValueError("shard size: must be at least 1")
    report = ExportReport(fmt, dest.url, job.total, failed=job.failed_count, missing=job.missing)
    on_row = on_row or (lambda n: None)
    if fmt == "imagefolder":
        _imagefolder(job, dest, resume, report, on_row)
    else:
        shard = _TarShard if fmt == "webdataset" else _ParquetShard
        _sharded(job, dest, shard, shard_size, shard_bytes, resume, report, on_row)
    _write_failures(job, dest)
    return report


def _write_failures(job: StoredJob, dest: Store) -> None:
    with tempfile.TemporaryDirectory(prefix="farm-export-") as tmp:
        path = Path(tmp) / "failed.jsonl"
        with path.open("w", encoding="utf-8") as out:
            for row in job.failures():
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        dest.put_file("failed.jsonl", path, "application/x-ndjson")


def image_name(job: StoredJob, item: Item) -> str:
    return keys.image(job.job_id, item.index, item.seed).rsplit("/", 1)[-1]


def _imagefolder(job: StoredJob, dest: Store, resume: bool, report: ExportReport, on_row: Progress) -> None:
    present = Bitmap(job.total)
    if resume:
        for key in dest.list("train"):
            index = index_of(key)
            if key.endswith(".png") and index is not None and index < job.total:
                present.add(index)
    writes = _Writes(dest)
    with tempfile.TemporaryDirectory(prefix="farm-export-") as tmp:
        metadata = Path(tmp) / "metadata.jsonl"
        try:
            with metadata.open("w", encoding="utf-8") as out:
                for item, data, row in _rows(job):
                    name = image_name(job, item)
                    if item.index not in present:
                        writes.put(f"train/{name}", data, "image/png")
                    out.write(json.dumps({"file_name": name, "text": item.prompt, **row}, ensure_ascii=False) + "\n")
                    report.exported += 1
                    on_row(report.exported)
        finally:
            writes.close()
        dest.put_file("train/metadata.jsonl", metadata, "application/x-ndjson")
    report.written.append("train/metadata.jsonl")


def _sharded(job: StoredJob, dest: Store, shard_type, shard_size: int, shard_bytes: int | None, resume: bool,
             report: ExportReport, on_row: Progress) -> None:
    number, start = 0, 0
    if resume:
        while dest.exists(marker := _marker(job, number)):
            done = json.loads(dest.get(marker))
            start, number = done["last"] + 1, number + 1
            report.exported += done["count"]
            report.skipped.append(done["shard"])
            on_row(report.exported)
    with tempfile.TemporaryDirectory(prefix="farm-export-") as tmp:
        shard = None
        for item, data, row in _rows(job, start):
            if shard is None:
                shard = shard_type(Path(tmp) / _shard_name(job, number, shard_type.SUFFIX), job)
            shard.add(item, data, row)
            report.exported += 1
            on_row(report.exported)
            if shard.count >= shard_size or (shard_bytes is not None and shard.bytes >= shard_bytes):
                report.written.append(_finish(job, dest, shard, number))
                shard, number = None, number + 1
        if shard is not None:
            report.written.append(_finish(job, dest, shard, number))


def _shard_name(job: StoredJob, number: int, suffix: str) -> str:
    return f"{job.job_id}-{number:06d}{suffix}"


def _marker(job: StoredJob, number: int) -> str:
    return f"{MARKERS}/{job.job_id}-{number:06d}.json"


def _finish(job: StoredJob, dest: Store, shard, number: int) -> str:
    """Upload a finished shard, then mark it done (a run killed between the two redoes it)."""
    shard.close()
    dest.put_file(shard.path.name, shard.path, shard.CONTENT_TYPE)
    marker = {"shard": shard.path.name, "first": shard.first, "last": shard.last, "count": shard.count,
              "bytes": shard.path.stat().st_size}
    dest.put(_marker(job, number), json.dumps(marker).encode(), "application/json")
    shard.path.unlink()
    return shard.path.name


class _Shard:
    SUFFIX = CONTENT_TYPE = ""

    def __init__(self, path: Path, job: StoredJob):
        self.path, self.job = path, job
        self.count = self.bytes = 0
        self.first = self.last = -1
        # Sample keys sort as the items do, however many there are.
        self.key_width = max(6, len(str(job.total - 1)))

    def add(self, item: Item, data: bytes, row: dict) -> None:
        if self.first < 0:
            self.first = item.index
        self.last = item.index
        self.count += 1
        self.bytes += len(data)

    def close(self) -> None:
        raise NotImplementedError


class _TarShard(_Shard):
    SUFFIX, CONTENT_TYPE = ".tar", "application/x-tar"

    def __init__(self, path: Path, job: StoredJob):
        super().__init__(path, job)
        self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)

    def add(self, item: Item, data: bytes, row: dict) -> None:
        super().add(item, data, row)
        key = f"{item.index:0{self.key_width}d}"
        for suffix, payload in ((".png", data), (".txt", item.prompt.encode()),
                                (".json", json.dumps(row, ensure_ascii=False).encode())):
            info = tarfile.TarInfo(key + suffix)
            # Fixed owner, mode and time: the same job exports to the same bytes.
            info.size, info.mtime, info.mode = len(payload), self.job.created, 0o644
            self.tar.addfile(info, io.BytesIO(payload))

    def close(self) -> None:
        self.tar.close()


def arrow_schema():
    """The Parquet schema: COLUMNS, then `image` as `datasets` stores images; the `datasets`
    features in the metadata, so it decodes `image` to a picture."""
    import pyarrow as pa

    types = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string()}
    fields = [pa.field(name, types[kind]) for name, kind in COLUMNS]
    fields.append(pa.field("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
    features = {name: {"dtype": kind, "_type": "Value"} for name, kind in COLUMNS}
    features["image"] = {"_type": "Image"}
    return pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": features}})})


class _ParquetShard(_Shard):
    SUFFIX, CONTENT_TYPE = ".parquet", "application/vnd.apache.parquet"

    def __init__(self, path: Path, job: StoredJob):
        super().__init__(path, job)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError("the parquet format needs pyarrow: pip install 'farm[export]'") from None
        self.schema = arrow_schema()
        self.writer = pq.ParquetWriter(path, self.schema)
        self.rows: list[dict] = []

    def add(self, item: Item, data: bytes, row: dict) -> None:
        super().add(item, data, row)
        self.rows.append({**row, "image": {"bytes": data, "path": image_name(self.job, item)}})
        if len(self.rows) >= ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self.writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()
