"""Reading training records from disk, streamed: linear time, memory bounded by one record.

``open_records(source)`` returns a ``RecordStream``: an iterator of ``Record`` (the
decoded JSON value, or the row of a dataset, and where it came from) that also says
how far it has got (``done`` of ``total``, for a progress bar with rate and ETA).

- JSONL: one record per line, read line by line.
- A JSON array (``[`` first, e.g. LLaVA-Pretrain's ``blip_laion_cc_sbu_558k.json`` or
  the 665K LLaVA-1.5 mix): decoded element by element with ``json.JSONDecoder.raw_decode``
  over a buffer refilled from the file in 1 MB blocks; the consumed text is dropped and
  its newlines counted once, so every record keeps its line number without rescanning.
  After a syntax error the rest of an array cannot be read: that is one bad record.
- Hugging Face ``datasets`` (the optional ``datasets`` extra): a folder written by
  ``Dataset.save_to_disk`` (a ``DatasetDict`` folder: its ``train`` split), ``.parquet``
  files (read a row group at a time with pyarrow), or ``hf:<hub id>[:split]`` through
  ``datasets.load_dataset`` in streaming mode. Image columns (``datasets.Image`` or raw)
  are read as bytes, never decoded here: ``{"bytes", "path"}`` structs, raw bytes,
  paths, or PIL images (kept as they are).
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import one_line

BLOCK = 1 << 20
MAX_RECORD = 256 << 20  # a "record" this long is a syntax error that swallowed the file
HUB_PREFIX = "hf:"
_SPACE = re.compile(r"[ \t\n\r]*")


class ReaderError(ValueError):
    """The source cannot be read at all (not a bad record); one line for the user."""


@dataclass
class Record:
    """A raw record and where it came from: ``path:line`` in a file, ``path[row]`` in a dataset."""

    data: Any
    path: Any
    line: int
    error: Optional[str] = None
    row: bool = False

    @property
    def where(self) -> str:
        return f"{self.path}[{self.line}]" if self.row else f"{self.path}:{self.line}"


class ImageBytes(bytes):
    """An encoded image held in memory (from a dataset column); ``name`` says which.

    It is ``bytes``, so ``load_image`` decodes it and ``image_key`` hashes it.
    """

    name: str = "<image bytes>"

    def __new__(cls, data: bytes, name: str):
        out = super().__new__(cls, data)
        out.name = name
        return out

    def __repr__(self) -> str:
        return f"<{self.name}, {len(self)} bytes>"

    def __str__(self) -> str:
        return self.name


class RecordStream:
    """Iterator of ``Record``; ``done`` / ``total`` in ``unit`` for progress reports."""

    def __init__(self, records: Iterator[Record], total: Optional[int], unit: str):
        self._records, self.total, self.unit, self.done = records, total, unit, 0

    def __iter__(self):
        return self

    def __next__(self) -> Record:
        return next(self._records)


def is_dataset(source) -> bool:
    """True for the sources read through ``datasets`` / pyarrow rather than as JSON."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return True
    path = Path(text)
    return path.is_dir() or path.suffix.lower() == ".parquet"


def check_source(source) -> None:
    """ReaderError unless ``source`` names something ``open_records`` can read."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        if not text[len(HUB_PREFIX) :].split(":")[0]:
            raise ReaderError(f"{text}: expected hf:<dataset id>[:split]")
        return
    path = Path(text).expanduser()
    if path.is_dir():
        if not _saved_dataset(path):
            raise ReaderError(f"{path}: a folder that is not a saved Hugging Face dataset")
    elif not path.is_file():
        raise ReaderError(f"{path}: no such data file")


def open_records(source) -> RecordStream:
    """The records of a JSONL / JSON array file, a parquet file, a saved dataset or a hub id."""
    if is_dataset(source):
        return _dataset_records(source)
    path = Path(source).expanduser()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(codecs.BOM_UTF8):
        head = head[3:].lstrip()
    stream = RecordStream(iter(()), size, "B")
    reader = _array_records if head.startswith(b"[") else _jsonl_records
    stream._records = reader(path, stream)
    return stream


# ------------------------------------------------------------------ JSON
def _jsonl_records(path: Path, stream: RecordStream) -> Iterator[Record]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            stream.done += len(raw)
            if not raw.strip():
                continue
            try:
                yield Record(json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8")), path, n)
            except (ValueError, UnicodeDecodeError) as e:
                yield Record(None, path, n, f"malformed JSON ({one_line(e)})")


class _Buffer:
    """Text of a file from ``start`` on, refilled in blocks; counts lines as it goes."""

    def __init__(self, f, stream: RecordStream):
        self.f, self.stream = f, stream
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.pos, self.eof = "", 0, False
        self.line, self.counted = 1, 0  # line number at text[counted]

    def more(self) -> bool:
        """Append a block; False at the end of the file."""
        if self.eof:
            return False
        block = self.f.read(BLOCK)
        self.stream.done += len(block)
        self.eof = not block
        self.line += self.text.count("\n", self.counted, self.pos)
        self.text = self.text[self.pos :] + self.decoder.decode(block, final=self.eof)
        self.pos = self.counted = 0
        return True

    def skip_space(self) -> None:
        while True:
            self.pos = _SPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.more():
                return

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def line_at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line


def _array_records(path: Path, stream: RecordStream) -> Iterator[Record]:
    decoder = json.JSONDecoder()
    with open(path, "rb") as f:
        buf = _Buffer(f, stream)
        try:
            buf.peek()
        except UnicodeDecodeError as e:
            yield Record(None, path, 1, f"not UTF-8 text ({one_line(e)})")
            return
        buf.pos += 1  # the "["
        while True:
            try:
                c = buf.peek()
            except UnicodeDecodeError as e:
                yield Record(None, path, buf.line_at(buf.pos), f"not UTF-8 text ({one_line(e)})")
                return
            if c == "]":
                return
            line = buf.line_at(buf.pos)
            value, error = _decode_one(decoder, buf)
            if error:
                yield Record(None, path, line, f"malformed JSON ({error}); rest of file unread")
                return
            yield Record(value, path, line)
            c = buf.peek()
            if c == ",":
                buf.pos += 1
            elif c != "]":
                line = buf.line_at(buf.pos)
                yield Record(None, path, line, "malformed JSON array (expected ',' or ']')")
                return


def _decode_one(decoder: json.JSONDecoder, buf: _Buffer):
    """(value, None) or (None, reason): one JSON value at ``buf.pos``, refilling as needed."""
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
            if end < len(buf.text) or buf.eof:  # a number at the very end may go on
                buf.pos = end
                return value, None
        except ValueError as e:
            if buf.eof or len(buf.text) - buf.pos > MAX_RECORD:
                return None, one_line(e)
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 text ({one_line(e)})"
        try:
            buf.more()
        except UnicodeDecodeError as e:
            return None, f"not UTF-8 text ({one_line(e)})"


# ------------------------------------------------------------------ datasets
def _saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise ReaderError(
            "reading Hugging Face datasets needs the 'datasets' package "
            "(pip install 'mlx-llama3v[datasets]')"
        ) from None
    return datasets


def _dataset_records(source) -> RecordStream:
    text = str(source)
    if text.startswith(HUB_PREFIX):
        datasets = _import_datasets()
        name, _, split = text[len(HUB_PREFIX) :].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        except Exception as e:  # hub, network and builder errors come in many types
            raise ReaderError(f"{text}: cannot load the dataset ({one_line(e)})") from None
        ds = _raw_images(ds, datasets)
        return RecordStream(_rows(iter(ds), text), None, "rec")
    path = Path(text).expanduser()
    if path.suffix.lower() == ".parquet":
        return _parquet_records(path)
    datasets = _import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ReaderError(f"{path}: cannot open the saved dataset ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ReaderError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    ds = _raw_images(ds, datasets)
    stream = RecordStream(iter(()), len(ds), "rec")
    stream._records = _counted(_rows(_batched_rows(ds), path), stream)
    return stream


def load_local_dataset(path: Path):
    """A saved dataset folder (its ``train`` split) or a parquet file as a memory-mapped
    ``datasets.Dataset``, image columns undecoded (for random access by row)."""
    datasets = _import_datasets()
    try:
        if Path(path).suffix.lower() == ".parquet":
            ds = datasets.Dataset.from_parquet(str(path))
        else:
            ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets and pyarrow raise many types
        raise ReaderError(f"{path}: cannot open the dataset ({one_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ReaderError(f"{path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
        ds = ds["train"]
    return _raw_images(ds, datasets)


def _raw_images(ds, datasets):
    """Image columns as ``{"bytes", "path"}`` (no decoding while reading)."""
    features = getattr(ds, "features", None) or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Sequence) and isinstance(feature.feature, datasets.Image):
            ds = ds.cast_column(name, datasets.Sequence(datasets.Image(decode=False)))
        elif isinstance(feature, list) and feature and isinstance(feature[0], datasets.Image):
            ds = ds.cast_column(name, [datasets.Image(decode=False)])
    return ds


def _batched_rows(ds, size: int = 1000) -> Iterator[dict]:
    for start in range(0, len(ds), size):
        batch = ds[start : start + size]
        names = list(batch)
        for i in range(len(batch[names[0]]) if names else 0):
            yield {k: batch[k][i] for k in names}


def _parquet_records(path: Path) -> RecordStream:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        _import_datasets()  # the same advice: pyarrow comes with datasets
        raise
    try:
        f = pq.ParquetFile(path)
    except Exception as e:
        raise ReaderError(f"{path}: cannot read the parquet file ({one_line(e)})") from None

    def rows():
        for batch in f.iter_batches(batch_size=1000):
            yield from batch.to_pylist()

    stream = RecordStream(iter(()), f.metadata.num_rows, "rec")
    stream._records = _counted(_rows(rows(), path), stream)
    return stream


def _counted(records: Iterator[Record], stream: RecordStream) -> Iterator[Record]:
    for r in records:
        stream.done += 1
        yield r


def _rows(rows: Iterator[dict], path) -> Iterator[Record]:
    for n, row in enumerate(rows):
        yield Record(_row_images(row, path, n), path, n, row=True)


def _row_images(row: dict, path, n: int) -> dict:
    """A row with its image values as paths or ``ImageBytes``."""
    out = dict(row)
    for key in ("image", "images"):
        if key in out and out[key] is not None:
            out[key] = _image_value(out[key], f"{path}[{n}].{key}")
    return out


def _image_value(value, name: str):
    if isinstance(value, dict):
        if "bytes" in value or "path" in value:
            if value.get("bytes") is not None:
                return ImageBytes(value["bytes"], name)
            return value.get("path")
        # MiniCPM-V style {"<image_00>": ...}: keep the mapping, convert its values
        return {k: _image_value(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageBytes(bytes(value), name)
    if isinstance(value, (list, tuple)):
        return [_image_value(v, f"{name}[{i}]") for i, v in enumerate(value)]
    return value  # a path, or a PIL image


def normalised(path) -> str:
    """An image path as the feature cache's path map stores it."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))
