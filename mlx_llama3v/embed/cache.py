"""The feature cache on disk: its format, the shard writer, the reader and ``verify``.

A cache folder holds::

    index.json                 settings + the committed shards, with checksums
    shards/r000-000001.safetensors   features: "<sha256>.<tile>" (+ ".<tile>.scale" for int8)
    shards/r000-000001.json    the shard's images: sha256 -> slice grid, tile patch grids
    report.json                the last run's counts, skipped images, bytes and error
    index.rank<R>.json         per-rank journals of a distributed run (merged at its end)

Images are keyed by the sha256 of their file bytes, so a picture stored under two
names is encoded and stored once. ``index.json`` holds the settings that made the
features (the vision config, the preprocessing settings, the stored dtype and a
fingerprint of the tower's weights) and, per shard, the sha256 and size of both
files, its image/tile counts and the stored-vs-float error. Per-image entries live
in the small per-shard JSON files, so committing a shard rewrites only the short
index, never a list of every image.

Crash safety: a shard and its entries are written under temporary names, fsynced
and renamed; only then is the shard added to the index (itself written to a temporary
file and renamed). A kill at any moment leaves the index naming only complete,
checksummed shards; files it does not name are removed by the next run.

The reader memory-maps shards and reads only the tensors asked for.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np

from ..errors import DamagedFileError
from ..files import (
    fsync_path,
    removed_on_failure,
    safetensors_header,
    sha256_file,
    temp_name,
    write_atomic,
    writing,
)
from ..models.vision import TileBatch
from .codec import MLX, NUMPY, TAGS, ErrorStats
from ..errors import UserError

FORMAT = "mlx_llama3v.embed"
VERSION = 1
INDEX = "index.json"
SHARDS = "shards"
REPORT = "report.json"
_HEX = frozenset("0123456789abcdef")


class CacheError(UserError):
    """The cache folder cannot be used as asked; the message is one line for the user."""


# ------------------------------------------------------------------ atomic files
def write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1).encode())


def read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CacheError(f"{path} is not valid JSON ({e})") from None


# ------------------------------------------------------------------ safetensors
def write_safetensors(
    path: Path,
    tensors: Sequence[Tuple[str, np.ndarray, str]],
    metadata: Optional[Dict[str, str]] = None,
    midway: Optional[Callable[[], None]] = None,
) -> Tuple[str, int]:
    """Write (name, array, dtype tag) tensors as safetensors, atomically.

    The file goes to a temporary name, is fsynced and renamed. Returns its sha256 and
    size, computed while writing. ``midway`` runs after half the tensors (tests use it
    to be killed inside a write).
    """
    header, offset = {}, 0
    for name, arr, tag in tensors:
        header[name] = {
            "dtype": tag,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = metadata
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    h = hashlib.sha256()
    tmp = temp_name(Path(path))
    with removed_on_failure(tmp), writing(path), open(tmp, "wb") as f:

        def put(data) -> None:
            h.update(data)
            f.write(data)

        put(struct.pack("<Q", len(head)) + head)
        for i, (_, arr, _) in enumerate(tensors):
            if midway is not None and i == len(tensors) // 2:
                f.flush()
                midway()
            put(memoryview(np.ascontiguousarray(arr)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
        size = f.tell()
    os.replace(tmp, path)
    return h.hexdigest(), size


def read_safetensors_header(buf) -> Tuple[dict, int]:
    """(header, offset of the data) of a safetensors file in ``buf`` (bytes or mmap)."""
    try:
        return safetensors_header(buf)
    except DamagedFileError as e:
        raise CacheError(str(e)) from None


# ------------------------------------------------------------------ index and journals
def journal_name(rank: int, size: int) -> str:
    """Where a writer commits its shards: the index itself, or a per-rank journal."""
    return INDEX if size == 1 else f"index.rank{rank}.json"


def new_index(settings: dict, model: str) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "settings": settings,
        "shards": [],
    }


def load_index(root: Path) -> Optional[dict]:
    path = Path(root) / INDEX
    if not path.exists():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheError(f"{path} is not an mlx_llama3v.embed index")
    if doc.get("version") != VERSION:
        raise CacheError(
            f"{path} has format version {doc.get('version')}, this version reads {VERSION}"
        )
    return doc


def rank_journals(root: Path) -> List[Path]:
    return sorted(Path(root).glob("index.rank*.json"))


def committed_shards(root: Path, doc: Optional[dict] = None) -> List[dict]:
    """Shard records of the index and of any per-rank journals not merged yet."""
    doc = doc if doc is not None else load_index(root)
    records = list(doc["shards"]) if doc else []
    names = {r["name"] for r in records}
    for path in rank_journals(root):
        try:
            journal = read_json(path)
        except (CacheError, OSError):
            continue  # a journal is replaced atomically; an unreadable one names nothing
        for r in journal.get("shards", []):
            if r["name"] not in names:
                names.add(r["name"])
                records.append(r)
    return records


def settings_difference(old: dict, new: dict) -> Optional[str]:
    """None, or a short description of the first setting that differs."""
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key in ("vision_config", "processor_config") and isinstance(old.get(key), dict):
                sub = settings_difference(old[key], new.get(key) or {})
                return f"{key}.{sub}" if sub else key
            a, b = old.get(key), new.get(key)
            short = lambda v: v if len(str(v)) < 40 else str(v)[:12] + "..."  # noqa: E731
            return f"{key}: {short(a)} in the cache, {short(b)} now"
    return None


def check_out_folder(root: Path) -> None:
    """CacheError unless ``root`` is absent, empty, or a cache: a folder holding anything
    else is never adopted (its ``shards/`` would be cleaned up)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CacheError(f"--out {root} exists and is not a folder")
    if root.is_dir() and not (root / INDEX).exists() and set(os.listdir(root)) - {".lock"}:
        raise CacheError(f"--out {root} is not empty and holds no feature cache")


def open_for_writing(root: Path, settings: dict, model: str) -> dict:
    """The index of ``root``, created if absent; CacheError if made with other settings."""
    root = Path(root)
    check_out_folder(root)
    doc = load_index(root)
    (root / SHARDS).mkdir(parents=True, exist_ok=True)
    if doc is None:
        doc = new_index(settings, model)
        write_json(root / INDEX, doc)
        return doc
    diff = settings_difference(doc["settings"], settings)
    if diff:
        raise CacheError(
            f"{root} holds features made with other settings ({diff}); use another --out"
        )
    return doc


def merge_journals(root: Path) -> int:
    """Fold per-rank journals into index.json (atomically), then delete them."""
    root = Path(root)
    journals = rank_journals(root)
    if not journals:
        return 0
    doc = load_index(root)
    records = committed_shards(root, doc)
    added = len(records) - len(doc["shards"])
    doc["shards"] = records
    write_json(root / INDEX, doc)
    for path in journals:
        path.unlink()
    fsync_path(root)
    return added


def remove_orphans(root: Path, records: Sequence[dict]) -> int:
    """Delete shard files the index does not name (temporaries, or interrupted commits)."""
    keep = {r["name"] for r in records} | {r["entries"] for r in records}
    removed = 0
    for path in (Path(root) / SHARDS).iterdir():
        if path.name not in keep:
            path.unlink()
            removed += 1
    for path in Path(root).glob(".*.tmp-*"):
        path.unlink()
    return removed


# ------------------------------------------------------------------ writer
@dataclass
class EncodedImage:
    """One image's stored features, ready for a shard.

    ``tiles``: per tile, (values, scales or None) numpy arrays (values as written:
    bfloat16 as uint16 bits); ``patch_grids``: (rows, cols) of patches per tile;
    ``grid``: the (cols, rows) slice grid, or None.
    """

    key: str
    tiles: List[Tuple[np.ndarray, Optional[np.ndarray]]]
    patch_grids: List[Tuple[int, int]]
    grid: Optional[Tuple[int, int]]
    source: str
    stats: ErrorStats = field(default_factory=ErrorStats)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes + (0 if s is None else s.nbytes) for v, s in self.tiles)


class ShardWriter:
    """Buffers encoded images and commits them in shards of about ``shard_bytes``.

    Commit order: entries file, shard file (each temp + fsync + rename), then the
    journal (``index.json``, or this rank's journal in a distributed run).
    """

    def __init__(
        self,
        root: Path,
        journal: dict,
        journal_path: Path,
        dtype: str,
        rank: int = 0,
        shard_bytes: int = 512 << 20,
        midway: Optional[Callable[[], None]] = None,
    ):
        self.root, self.journal, self.journal_path = Path(root), journal, Path(journal_path)
        self.dtype, self.tag, self.rank = dtype, TAGS[dtype], rank
        self.shard_bytes, self.midway = shard_bytes, midway
        self.buffer: List[EncodedImage] = []
        self.buffered = 0
        self.seq = self._last_seq()
        self.shards_written = 0
        self.bytes_written = 0
        self.images_written = 0
        self.stats = ErrorStats()

    def _last_seq(self) -> int:
        prefix = f"r{self.rank:03d}-"
        seqs = [
            int(p.stem[len(prefix) :])
            for p in (self.root / SHARDS).glob(prefix + "*.safetensors")
            if p.stem[len(prefix) :].isdigit()
        ]
        return max(seqs, default=0)

    def add(self, image: EncodedImage) -> None:
        self.buffer.append(image)
        self.buffered += image.nbytes
        if self.buffered >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.seq += 1
        stem = f"r{self.rank:03d}-{self.seq:06d}"
        record = self._write_shard(stem, self.buffer)
        self.journal["shards"].append(record)
        write_json(self.journal_path, self.journal)
        self.shards_written += 1
        self.bytes_written += record["bytes"] + record["entries_bytes"]
        self.images_written += len(self.buffer)
        self.buffer, self.buffered = [], 0

    def _write_shard(self, stem: str, images: List[EncodedImage]) -> dict:
        folder = self.root / SHARDS
        entries = {
            im.key: {
                "grid": list(im.grid) if im.grid else None,
                "tiles": [list(g) for g in im.patch_grids],
                "source": im.source,
            }
            for im in images
        }
        entries_data = json.dumps({"format": FORMAT, "images": entries}, indent=0).encode()
        write_atomic(folder / f"{stem}.json", entries_data)
        tensors = []
        for im in images:
            for t, (values, scales) in enumerate(im.tiles):
                tensors.append((f"{im.key}.{t}", values, self.tag))
                if scales is not None:
                    tensors.append((f"{im.key}.{t}.scale", scales, "F32"))
        digest, size = write_safetensors(
            folder / f"{stem}.safetensors",
            tensors,
            {"format": FORMAT, "dtype": self.dtype},
            self.midway,
        )
        fsync_path(folder)
        stats = ErrorStats()
        for im in images:
            stats.add(im.stats)
        self.stats.add(stats)
        return {
            "name": f"{stem}.safetensors",
            "sha256": digest,
            "bytes": size,
            "entries": f"{stem}.json",
            "entries_sha256": hashlib.sha256(entries_data).hexdigest(),
            "entries_bytes": len(entries_data),
            "images": len(images),
            "tiles": sum(len(im.tiles) for im in images),
            "error": stats.to_dict(),
        }


# ------------------------------------------------------------------ reader
@dataclass
class CachedImage:
    """One cached image: per-tile features (tokens, width), the source image first.

    ``grid``: (cols, rows) of the slices, None when the image was not split;
    ``patch_grids``: (rows, cols) of patches of each tile (what the projector needs).
    """

    key: str
    tiles: List[mx.array]
    grid: Optional[Tuple[int, int]]
    patch_grids: List[Tuple[int, int]]


def image_key(image: Union[str, os.PathLike, bytes, bytearray, memoryview]) -> str:
    """The cache key of an image: a path's or bytes' sha256, or a sha256 hex string."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest()
    text = os.fspath(image)
    if isinstance(text, str) and len(text) == 64 and set(text) <= _HEX and not os.path.exists(text):
        return text
    try:
        return sha256_file(Path(text))
    except OSError as e:
        raise KeyError(f"{text}: cannot read the image to hash it ({e.strerror})") from None


class _Shard:
    """A memory-mapped shard and its parsed header."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        size = os.fstat(self.file.fileno()).st_size
        self.map = mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ) if size else b""
        self.header, self.start = read_safetensors_header(self.map)

    def tensor(self, name: str) -> mx.array:
        info = self.header[name]
        tag, (a, b) = info["dtype"], info["data_offsets"]
        dtype = NUMPY[tag]
        arr = np.frombuffer(
            self.map, dtype=dtype, count=(b - a) // np.dtype(dtype).itemsize, offset=self.start + a
        ).reshape(info["shape"])
        out = mx.array(arr)
        return out.view(MLX[tag]) if tag == "BF16" else out

    def close(self) -> None:
        if isinstance(self.map, mmap.mmap):
            self.map.close()
        self.file.close()


class FeatureCache:
    """Read a feature cache: ``cache[image] -> CachedImage``.

    ``image`` is a path, the image's bytes, or its sha256 hex key. int8 features come
    back dequantized (float32); ``dtype`` casts every result (e.g. ``mx.float32``).
    Shards are memory-mapped on first use (at most ``max_open`` at once) and only the
    requested tensors are read.
    """

    def __init__(self, path, dtype=None, max_open: int = 64):
        self.root = Path(path).expanduser()
        doc = load_index(self.root)
        if doc is None:
            raise CacheError(f"{self.root} is not a feature cache (no {INDEX})")
        self.index = doc
        self.settings: dict = doc["settings"]
        self.shards = committed_shards(self.root, doc)
        self.dtype, self.max_open = dtype, max_open
        self._entries: Optional[Dict[str, Tuple[str, dict]]] = None
        self._open: "OrderedDict[str, _Shard]" = OrderedDict()
        self._lock = threading.Lock()

    @property
    def stored_dtype(self) -> str:
        return self.settings["dtype"]

    @property
    def entries(self) -> Dict[str, Tuple[str, dict]]:
        """key -> (shard name, entry); read from the shards' entry files once."""
        if self._entries is None:
            entries = {}
            for r in self.shards:
                data = read_json(self.root / SHARDS / r["entries"])
                for key, entry in data["images"].items():
                    entries.setdefault(key, (r["name"], entry))
            self._entries = entries
        return self._entries

    def key(self, image) -> str:
        return image_key(image)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def keys(self):
        return self.entries.keys()

    def __contains__(self, image) -> bool:
        try:
            return self.key(image) in self.entries
        except KeyError:
            return False

    def __getitem__(self, image) -> CachedImage:
        key = self.key(image)
        found = self.entries.get(key)
        if found is None:
            raise KeyError(
                f"{image if isinstance(image, (str, os.PathLike)) else key}: not in the cache"
            )
        name, entry = found
        tiles = [self._tile(name, key, t) for t in range(len(entry["tiles"]))]
        grid = tuple(entry["grid"]) if entry["grid"] else None
        return CachedImage(key, tiles, grid, [tuple(g) for g in entry["tiles"]])

    def get(self, image, default=None):
        try:
            return self[image]
        except KeyError:
            return default

    def _tile(self, shard_name: str, key: str, t: int) -> mx.array:
        with self._lock:
            shard = self._shard(shard_name)
            values = shard.tensor(f"{key}.{t}")
            scale_name = f"{key}.{t}.scale"
            if scale_name in shard.header:
                values = values.astype(mx.float32) * shard.tensor(scale_name)
        return values if self.dtype is None else values.astype(self.dtype)

    def _shard(self, name: str) -> _Shard:
        shard = self._open.pop(name, None)
        if shard is None:
            shard = _Shard(self.root / SHARDS / name)
            while len(self._open) >= self.max_open:
                self._open.popitem(last=False)[1].close()
        self._open[name] = shard
        return shard

    def error(self) -> ErrorStats:
        """Stored-vs-float error over every committed shard."""
        stats = ErrorStats()
        for r in self.shards:
            stats.add(ErrorStats.from_dict(r.get("error")))
        return stats

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._open.popitem()[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def stack_features(images: Sequence[CachedImage]) -> Tuple[mx.array, TileBatch]:
    """Every tile of ``images`` in order, padded into one (B, L, width) batch, with the
    ``TileBatch`` a projector takes (``Model.project(features, batch)``)."""
    tiles = [t for im in images for t in im.tiles]
    grids = [tuple(g) for im in images for g in im.patch_grids]
    if not tiles:
        raise ValueError("no tiles to stack")
    lengths = [t.shape[0] for t in tiles]
    L = max(lengths)
    padded = [mx.pad(t, [(0, L - t.shape[0]), (0, 0)]) if t.shape[0] < L else t for t in tiles]
    mask = None
    if min(lengths) != L:
        mask = mx.array((np.arange(L)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :])
    batch = TileBatch(
        mx.zeros((len(tiles), L, 0)), mx.zeros((len(tiles), L), mx.int32), grids, lengths, mask
    )
    return mx.stack(padded), batch


# ------------------------------------------------------------------ verify
def verify(path) -> Tuple[int, List[Tuple[str, str]]]:
    """(shards checked, [(file, problem)]) for every committed shard and entries file."""
    root = Path(path).expanduser()
    doc = load_index(root)
    if doc is None:
        raise CacheError(f"{root} is not a feature cache (no {INDEX})")
    records = committed_shards(root, doc)
    bad = []
    for r in records:
        for name, digest, size in (
            (r["name"], r["sha256"], r["bytes"]),
            (r["entries"], r["entries_sha256"], r.get("entries_bytes")),
        ):
            problem = _check_file(root / SHARDS / name, digest, size)
            if problem:
                bad.append((name, problem))
    return len(records), bad


def _check_file(path: Path, digest: str, size: Optional[int]) -> Optional[str]:
    if not path.exists():
        return "missing"
    actual = path.stat().st_size
    if size is not None and actual != size:
        return f"size {actual} bytes, the index records {size}"
    if sha256_file(path) != digest:
        return "checksum mismatch"
    return None
