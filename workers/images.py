"""Init images and masks prepared as the webui prepares them (`images.resize_image`,
`processing.create_binary_mask`, `masking.fill`), in PIL and numpy."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from farm.errors import PermanentError
from farm.spec import ResizeMode


class BadImage(PermanentError):
    """An init image or mask that cannot be decoded."""


def decode(data: bytes, what: str) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"the {what} is not a readable image: {e}") from None


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency flattened onto white as the webui does."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, "white")
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _resize(image: Image.Image, w: int, h: int) -> Image.Image:
    return image.resize((w, h), resample=Image.Resampling.LANCZOS)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """Just resize (stretch), crop and resize (cover), resize and fill (fit, edges stretched)."""
    if mode == ResizeMode.JUST_RESIZE:
        return _resize(image, width, height)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == ResizeMode.CROP_AND_RESIZE:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _resize(image, src_w, src_h)
    out = Image.new("RGB", (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == ResizeMode.RESIZE_AND_FILL:
        if ratio < src_ratio:
            fill = height // 2 - src_h // 2
            if fill > 0:
                out.paste(resized.resize((width, fill), box=(0, 0, width, 0)), box=(0, 0))
                out.paste(resized.resize((width, fill), box=(0, resized.height, width, resized.height)),
                          box=(0, fill + src_h))
        elif ratio > src_ratio:
            fill = width // 2 - src_w // 2
            if fill > 0:
                out.paste(resized.resize((fill, height), box=(0, 0, 0, height)), box=(0, 0))
                out.paste(resized.resize((fill, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill + src_w, 0))
    return out


def binary_mask(mask: Image.Image) -> Image.Image:
    """White repaints. A mask with real alpha is read from its alpha (> 128), else from its grey value."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        grey = mask.split()[-1].convert("L")
    else:
        grey = mask.convert("L")
    return grey.point(lambda x: 255 if x > 128 else 0)


def gaussian_kernel(blur: int) -> np.ndarray:
    """cv2.getGaussianKernel with the webui's size, 2 * int(2.5 * blur + 0.5) + 1."""
    size = 2 * int(2.5 * blur + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x ** 2) / (2 * blur * blur))
    return kernel / kernel.sum()


def blur_mask(mask: Image.Image, blur: int) -> Image.Image:
    """Separable Gaussian blur, borders reflected as OpenCV's default (reflect-101) does."""
    if blur <= 0:
        return mask
    kernel = gaussian_kernel(blur)
    pad = len(kernel) // 2
    a = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        widths = [(0, 0), (0, 0)]
        widths[axis] = (pad, pad)
        padded = np.pad(a, widths, mode="reflect") if a.shape[axis] > pad else np.pad(a, widths, mode="edge")
        a = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def prepare_mask(mask: Image.Image, size: tuple[int, int], invert: bool, blur: int) -> Image.Image:
    mask = binary_mask(mask)
    if mask.size != size:
        mask = mask.resize(size, resample=Image.Resampling.LANCZOS)
    if invert:
        mask = ImageOps.invert(mask)
    return blur_mask(mask, blur)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The webui's "fill": colour from around the mask smeared in by repeated blurs."""
    image_mod = Image.new("RGBA", image.size)
    image_masked = Image.new("RGBa", image.size)
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def overlay_mask(mask: Image.Image) -> Image.Image:
    """The webui composites "whole picture" results with the blurred mask doubled, so the
    blur's inner half is fully repainted and only its outer half blends."""
    return Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8), mode="L")
