"""A contact sheet: the job's images in one grid, seeds across, prompts and grid cells down."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def contact_sheet(images: Sequence[bytes], columns: int, row_labels: Sequence[str] = (), max_side: int = 256) -> Image.Image:
    tiles = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
    if not tiles:
        raise ValueError("no images to lay out")
    w, h = tiles[0].size
    scale = min(1.0, max_side / max(w, h))
    tw, th = max(1, int(w * scale)), max(1, int(h * scale))
    rows = -(-len(tiles) // columns)
    label_h = LABEL_HEIGHT if row_labels else 0
    sheet = Image.new("RGB", (columns * tw, rows * (th + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y = r * (th + label_h)
        if c == 0 and r < len(row_labels):
            draw.text((2, y + 1), row_labels[r][: max(8, columns * tw // 6)], fill="black")
        sheet.paste(tile.resize((tw, th), Image.Resampling.LANCZOS), (c * tw, y + label_h))
    return sheet


def write_job_sheet(job_dir: Path) -> Path | None:
    """`grid.png` beside a downloaded or `farm run` job's images, from its manifest and job.json:
    seeds across; prompts, then grid cells, down. None when the job has no images yet."""
    manifest_path = job_dir / "manifest.jsonl"
    if not manifest_path.exists():
        return None
    rows = [json.loads(line) for line in manifest_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    spec = json.loads((job_dir / "job.json").read_text())["spec"]
    seeds = spec["seeds"]
    columns = min(seeds["count"] if isinstance(seeds, dict) else len(seeds), len(rows))
    axes = list(spec.get("grid", {}))
    labels = [" | ".join([r["prompt"], *(f"{a} {r.get(a)}" for a in axes)]) for r in rows[::columns]]
    images = [(job_dir.parent / r["key"]).read_bytes() for r in rows]
    path = job_dir / "grid.png"
    contact_sheet(images, columns=columns, row_labels=labels).save(path)
    return path
