"""PNG bytes with the webui `parameters` text chunk."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin


def encode(image: Image.Image, parameters: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def read_parameters(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.info.get("parameters")
