"""Where the images to embed come from: a folder, a list of paths, or a LLaVA dataset.

``list_images(src, image_root)`` returns the image paths in a stable order, each
once (the first occurrence wins):

- a folder: every file with an image extension below it, recursively, sorted;
- a ``.json`` file: a LLaVA-style list of records (or ``{"data": [...]}``) whose
  ``image`` field is a path, a list of paths, or MiniCPM-V's ``{"<image_00>": path}``;
  records without one are text-only; read streamed (``train.readers``);
- a ``.jsonl`` file: one such record per line;
- a saved Hugging Face dataset folder or a ``.parquet`` file whose ``image`` (or
  ``images``) column holds paths or the images themselves (``datasets.Image`` /
  ``{"bytes", "path"}``): those become ``DatasetImage`` items, read from the
  memory-mapped dataset when they are hashed and decoded, never all held at once;
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
    if src.is_dir() and not _is_saved_dataset(src):
        return _unique(_walk(src))
    root = Path(image_root).expanduser() if image_root else src.parent
    if image_root and not root.is_dir():
        raise SourceError(f"--image-root {root} is not a folder")
    suffix = src.suffix.lower()
    if src.is_dir() or suffix == ".parquet":
        names = _dataset_images(src)
    elif suffix == ".json" and not _starts_with(src, b"{"):
        names = _streamed_images(src)
    elif suffix == ".json":
        names = _json_images(src)
    elif suffix == ".jsonl":
        names = _streamed_images(src)
    else:
        names = _text_lines(src)
    return _unique(n if isinstance(n, DatasetImage) else root / n for n in names)


class DatasetImage:
    """An image stored inside a dataset row, read on demand (``read_bytes``).

    ``sub`` picks it out of a list or ``{marker: image}`` value; the name
    (``dataset[row].column``) stands for it in messages and reports.
    """

    def __init__(self, ds, row: int, column: str, sub, source: Path):
        self.ds, self.row, self.column, self.sub = ds, row, column, sub
        self.name = f"{source}[{row}].{column}" + ("" if sub is None else f"[{sub!r}]")

    def read_bytes(self) -> bytes:
        value = self.ds[self.row][self.column]
        if self.sub is not None:
            value = value[self.sub]
        if isinstance(value, dict):
            value = value.get("bytes")
        if not isinstance(value, (bytes, bytearray)):
            raise OSError(f"no image bytes in {self.name}")
        return bytes(value)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _dataset_images(path: Path) -> Iterator:
    """Paths (relative ones as they are) and ``DatasetImage`` items of a dataset's image column."""
    from ..train.readers import ReaderError, load_local_dataset

    try:
        ds = load_local_dataset(path)
    except ReaderError as e:
        raise SourceError(str(e)) from None
    column = next((c for c in ("image", "images") if c in ds.column_names), None)
    if column is None:
        return
    view = ds.select_columns([column])
    for start in range(0, len(view), 1000):
        for j, value in enumerate(view[start : start + 1000][column]):
            yield from _dataset_values(value, ds, start + j, column, None, path)


def _dataset_values(value, ds, row: int, column: str, sub, path: Path) -> Iterator:
    if value is None:
        return
    if isinstance(value, str) and value:
        yield value
    elif isinstance(value, (bytes, bytearray)) or (
        isinstance(value, dict) and value.get("bytes") is not None
    ):
        yield DatasetImage(ds, row, column, sub, path)
    elif isinstance(value, dict) and value.get("path"):
        yield value["path"]
    elif isinstance(value, dict) and sub is None:  # MiniCPM-V {marker: image}
        for k, v in value.items():
            yield from _dataset_values(v, ds, row, column, k, path)
    elif isinstance(value, list) and sub is None:
        for k, v in enumerate(value):
            yield from _dataset_values(v, ds, row, column, k, path)
    else:
        raise SourceError(f"{path}: row {row} has an {column!r} that is not an image or a path")


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                yield Path(dirpath) / name


def _unique(paths: Iterable) -> List:
    seen, out = set(), []
    for p in paths:
        if isinstance(p, DatasetImage):
            if p.name not in seen:
                seen.add(p.name)
                out.append(p)
            continue
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


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4096).lstrip().lstrip(b"\xef\xbb\xbf").lstrip().startswith(prefix)
    except OSError as e:
        raise SourceError(f"cannot read {path} ({e})") from None


def _streamed_images(path: Path) -> Iterator[str]:
    """Image paths of the records of a JSON array / JSONL file or a dataset, streamed."""
    from ..train.readers import ReaderError, open_records

    try:
        records = open_records(path)
        for rec in records:
            unit = "row" if rec.row else "line"
            if rec.error:
                raise SourceError(f"{path}: invalid JSON on {unit} {rec.line} ({rec.error})")
            yield from _record_images(rec.data, path, f"{unit} {rec.line}")
    except ReaderError as e:
        raise SourceError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path} ({e})") from None


def _record_images(rec, path: Path, where: str) -> List[str]:
    if not isinstance(rec, dict):
        raise SourceError(f"{path}: {where} is not an object")
    image = rec.get("image", rec.get("images"))
    if image is None:
        return []
    images = list(image.values()) if isinstance(image, dict) else image
    images = images if isinstance(images, list) else [images]
    if not all(isinstance(i, str) and i for i in images):
        kind = "image bytes" if any(isinstance(i, bytes) for i in images) else "not a path"
        raise SourceError(
            f"{path}: {where} has an 'image' that is {kind} (embed reads image files: "
            "a path, a list of paths or a {marker: path} mapping)"
        )
    return images


def describe(src) -> str:
    """How ``src`` will be read, for the log line."""
    src = Path(src)
    if src.is_dir():
        return f"folder {src}"
    if src.is_dir() and _is_saved_dataset(src):
        return f"dataset {src}"
    kind = {".json": "LLaVA JSON", ".jsonl": "LLaVA JSONL", ".parquet": "parquet"}.get(
        src.suffix.lower(), "path list"
    )
    return f"{kind} {src}"
