"""Fetch the images of ``image_url`` content parts, within limits.

- ``data:image/...;base64,...``: decoded (at most ``max_bytes`` once decoded);
- ``http://`` / ``https://``: fetched with ``urllib`` within ``timeout`` seconds,
  refused above ``max_bytes`` (by Content-Length, and while reading);
- a local path or ``file://`` URL: only when the server allows local images.

The bytes are then decoded by ``processing.load_image``, which bounds the pixel count
(``max_pixels``) from the header before decoding. Every failure is an ``APIError``
400 naming the part (``messages[i].content[j].image_url``).
"""

from __future__ import annotations

import base64
import binascii
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from PIL import Image

from ..processing import MAX_IMAGE_PIXELS, ImageError, load_image
from .schema import APIError, ImagePart

DEFAULT_MAX_BYTES = 20 * 2**20
DEFAULT_TIMEOUT = 10.0
_CHUNK = 64 * 1024


@dataclass
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: Optional[int] = MAX_IMAGE_PIXELS
    timeout: float = DEFAULT_TIMEOUT
    allow_local: bool = False


def fetch_image(part: ImagePart, limits: ImageLimits) -> Image.Image:
    url = part.url.strip()
    scheme = (
        urllib.parse.urlsplit(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    )
    if scheme == "data":
        data = _data_url(url, part, limits)
    elif scheme in ("http", "https"):
        data = _download(url, part, limits)
    elif scheme in ("", "file"):
        data = _local(url, part, limits)
    else:
        raise _bad(part, f"unsupported URL scheme {scheme!r} (use data:, http(s): or a path)")
    try:
        return load_image(data, max_pixels=limits.max_pixels)
    except ImageError as e:
        raise _bad(part, str(e).replace(f"<{len(data)} bytes>: ", "")) from None


def _bad(part: ImagePart, message: str) -> APIError:
    return APIError(400, f"{part.where}: {message}", param=part.where, code="invalid_image")


def _data_url(url: str, part: ImagePart, limits: ImageLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise _bad(part, "a data URL needs a ',' before its data")
    if not header.endswith(";base64"):
        raise _bad(part, "only base64 data URLs are supported (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _bad(part, f"the image is over the limit of {limits.max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(part, "the data URL is not valid base64") from None


def _download(url: str, part: ImagePart, limits: ImageLimits) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "mlx_llama3v.server"})
    try:
        with urllib.request.urlopen(request, timeout=limits.timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise _bad(
                    part, f"the image is {length} bytes, over the limit of {limits.max_bytes}"
                )
            data = bytearray()
            while True:
                piece = response.read(_CHUNK)
                if not piece:
                    break
                data += piece
                if len(data) > limits.max_bytes:
                    raise _bad(part, f"the image is over the limit of {limits.max_bytes} bytes")
            return bytes(data)
    except urllib.error.HTTPError as e:
        raise _bad(part, f"fetching {url} failed: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise _bad(part, f"fetching {url} failed ({reason})") from None


def _local(url: str, part: ImagePart, limits: ImageLimits) -> bytes:
    if not limits.allow_local:
        raise _bad(
            part,
            "local image paths are not allowed on this server (start it with "
            "--allow-local-images), send the image as a data: URL",
        )
    path = Path(
        urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file:") else url
    )
    path = path.expanduser()
    try:
        if path.stat().st_size > limits.max_bytes:
            raise _bad(part, f"{path} is over the limit of {limits.max_bytes} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise _bad(part, f"{path}: file not found") from None
    except IsADirectoryError:
        raise _bad(part, f"{path}: is a directory, not an image file") from None
    except OSError as e:
        raise _bad(part, f"{path}: cannot read file ({e.strerror})") from None
