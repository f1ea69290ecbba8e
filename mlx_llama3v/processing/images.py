"""Turn whatever a user hands in (path, bytes, PIL image, numpy array) into an RGB image.

Every route ends in one 8-bit RGB PIL image with the EXIF orientation applied, the first
frame of an animation, transparency composited on white and 16-bit data scaled to 8
bits. Anything that cannot be made into such an image raises ``ImageError`` whose
message is one line naming the source.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from ..errors import UserError, one_line

# Decompression-bomb guard: 8192 x 8192 (about 67 megapixels). The declared size is
# checked from the file header, before the pixel data is decoded. Pillow's own guard
# (Image.MAX_IMAGE_PIXELS, about 179 megapixels for an error) still applies above it.
MAX_IMAGE_PIXELS = 8192 * 8192

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(UserError, ValueError):
    """An image could not be loaded; the message names the source."""


def load_image(src: Any, max_pixels: Optional[int] = MAX_IMAGE_PIXELS) -> Image.Image:
    """Load ``src`` as an RGB PIL image.

    ``src``: a path (str or ``os.PathLike``), ``bytes``/``bytearray``, a binary file
    object, a PIL image, or a numpy array (HxW, HxWx1, HxWx3 or HxWx4; uint8, uint16,
    bool, or float with values in [0, 1]). ``max_pixels`` (None: no limit of ours) bounds
    width x height.
    """
    if isinstance(src, Image.Image):
        return _finish(src, "<PIL image>", max_pixels)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels)
    if isinstance(src, (str, os.PathLike)):
        return _from_path(src, max_pixels)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        return _decode(io.BytesIO(data), f"<{len(data)} bytes>", len(data), max_pixels)
    if hasattr(src, "read"):
        data = src.read()
        name = str(getattr(src, "name", f"<{type(src).__name__}>"))
        if not isinstance(data, bytes):
            raise ImageError(f"{name}: file object must be opened in binary mode")
        return _decode(io.BytesIO(data), name, len(data), max_pixels)
    raise ImageError(
        f"<{type(src).__name__}>: unsupported image source type; "
        "pass a path, bytes, a PIL image or a numpy array"
    )


def _from_path(src, max_pixels) -> Image.Image:
    name = os.fspath(src)
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    if name.startswith(("http://", "https://")):
        raise ImageError(f"{name}: URLs are not supported; download the image first")
    path = Path(name)
    if not path.exists():
        raise ImageError(f"{name}: file not found")
    if path.is_dir():
        raise ImageError(f"{name}: is a directory, not an image file")
    try:
        with open(path, "rb") as f:
            return _decode(f, name, path.stat().st_size, max_pixels)
    except PermissionError as e:
        raise ImageError(f"{name}: cannot read file ({e.strerror})") from None


def _decode(fp, name: str, size: int, max_pixels) -> Image.Image:
    if size == 0:
        raise ImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # the caller's max_pixels, checked below, is the limit that matters
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: {one_line(e)}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image (unknown format or corrupt file)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{name}: cannot read image ({one_line(e)})") from None
    return _finish(img, name, max_pixels)


def _finish(img: Image.Image, name: str, max_pixels) -> Image.Image:
    _check_pixels(img.size, name, max_pixels)  # before decoding: Image.open read the header only
    try:
        img.load()
    except Exception as e:  # Pillow's decoders raise a variety of types on bad data
        raise ImageError(f"{name}: corrupt or truncated image ({one_line(e)})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageError(f"{name}: cannot apply EXIF orientation ({one_line(e)})") from None
    return _to_rgb(img, name)


def _check_pixels(size: Tuple[int, int], name: str, max_pixels) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{name}: image is {w}x{h} ({w * h / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels / 1e6:.1f} megapixels (possible decompression bomb); "
            "pass max_pixels to raise it"
        )


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _gray_to_rgb(_sixteen_to_eight(np.asarray(img)))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(np.round(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8))
    try:
        if mode in _ALPHA_MODES or "transparency" in img.info:
            return _on_white(img.convert("RGBA"))
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{name}: cannot convert mode {mode} to RGB ({one_line(e)})") from None


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(gray)).convert("RGB")


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    # 65535 maps to 255 and k * 257 to k exactly
    arr = np.clip(arr.astype(np.float64), 0, 65535)
    return np.round(arr / 257.0).astype(np.uint8)


def _from_array(arr: np.ndarray, max_pixels) -> Image.Image:
    name = f"<array {'x'.join(map(str, arr.shape))} {arr.dtype}>"
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        hint = "; it looks channels-first, transpose it to HxWxC" if (
            arr.ndim == 3 and arr.shape[0] in (1, 3, 4)) else ""
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array{hint}")
    _check_pixels((arr.shape[1], arr.shape[0]), name, max_pixels)
    u8 = _array_to_uint8(arr, name)
    img = Image.fromarray(np.ascontiguousarray(u8))  # L, RGB or RGBA from the shape
    return _on_white(img) if img.mode == "RGBA" else img.convert("RGB")


def _array_to_uint8(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return _sixteen_to_eight(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"{name}: float image contains NaN or infinity")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"{name}: float image values must lie in [0, 1], found [{lo:g}, {hi:g}]")
        return np.round(arr.astype(np.float64) * 255.0).astype(np.uint8)
    raise ImageError(f"{name}: unsupported dtype; use uint8, uint16, bool or float in [0, 1]")
