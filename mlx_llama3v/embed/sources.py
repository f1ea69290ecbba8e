"""Where the images to embed come from: a folder, a list of paths, or a LLaVA dataset.

``list_images(src, image_root)`` returns the image paths in a stable order, each
once (the first occurrence wins):

- a folder: every file with an image extension below it, recursively, sorted;
- a ``.json`` file: a LLaVA-style list of records (or ``{"data": [...]}``) whose
  ``image`` field is a path or a list of paths; records without one are text-only;
- a ``.jsonl`` file: one such record per line;
- any other file: one path per line; blank lines and lines starting with ``#`` are
  ignored.

Relative paths in a list or dataset are resolved against ``image_root`` (default:
the folder holding the list). Problems with the source itself raise ``SourceError``
with a one-line message; missing images are not checked here (the pipeline skips
and reports them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, List
from ..errors import UserError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


class SourceError(UserError, ValueError):
    """The image source cannot be read; the message is one line for the user."""


def list_images(src, image_root=None) -> List[Path]:
    src = Path(src).expanduser()
    if not src.exists():
        raise SourceError(f"image source {src} not found")
    if src.is_dir():
        return _unique(_walk(src))
    root = Path(image_root).expanduser() if image_root else src.parent
    if image_root and not root.is_dir():
        raise SourceError(f"--image-root {root} is not a folder")
    suffix = src.suffix.lower()
    if suffix == ".json":
        names = _json_images(src)
    elif suffix == ".jsonl":
        names = _jsonl_images(src)
    else:
        names = _text_lines(src)
    return _unique(root / n for n in names)


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield Path(dirpath) / name


def _unique(paths: Iterable[Path]) -> List[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.normpath(p)
        if key not in seen:
            seen.add(key)
            out.append(Path(key))
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path} ({e})") from None


def _text_lines(path: Path) -> List[str]:
    lines = (line.strip() for line in _read_text(path).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _json_images(path: Path) -> List[str]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}: invalid JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a list of records with an 'image' field")
    return [name for i, rec in enumerate(data) for name in _record_images(rec, path, f"record {i}")]


def _jsonl_images(path: Path) -> List[str]:
    out = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: invalid JSON on line {n} ({e.msg})") from None
        out.extend(_record_images(rec, path, f"line {n}"))
    return out


def _record_images(rec, path: Path, where: str) -> List[str]:
    if not isinstance(rec, dict):
        raise SourceError(f"{path}: {where} is not an object")
    image = rec.get("image")
    if image is None:
        return []
    images = image if isinstance(image, list) else [image]
    if not all(isinstance(i, str) and i for i in images):
        raise SourceError(f"{path}: {where} has an 'image' that is not a path or a list of paths")
    return images


def describe(src) -> str:
    """How ``src`` will be read, for the log line."""
    src = Path(src)
    if src.is_dir():
        return f"folder {src}"
    kind = {".json": "LLaVA JSON", ".jsonl": "LLaVA JSONL"}.get(src.suffix.lower(), "path list")
    return f"{kind} {src}"
