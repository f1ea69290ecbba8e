"""The feature cache on disk: its format, the shard writer, the reader and ``verify``.

A cache folder holds::

    index.json                 settings + the committed shards, with checksums
    shards/r000-000001.safetensors   features: "<sha256>.<tile>" (+ ".<tile>.scale" for int8)
    shards/r000-000001.json    the shard's images: sha256 -> slice grid, tile patch grids,
                               crc32 of its tensors, where their bytes lie in the shard
    lookup.sqlite              the lookup table (``lookup``): key -> shard + entry, path -> key
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

Healing (``heal``, at the start of every run): a committed shard whose files are
missing, of the wrong size, or (when their size or mtime changed since they were last
confirmed) fail their checksums is dropped from the index, so its images are encoded
again and the cache passes ``verify`` afterwards.

The reader opens the index and the lookup table only (no per-image dict), memory-maps
shards, reads only the tensors asked for, and checks each image's crc32 (entries of the
first format, without one: the shard's sha256, once), naming a damaged shard.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import sqlite3
import struct
import threading
import zlib
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
from .lookup import _SCHEMA as _LOOKUP_SCHEMA
from .lookup import Lookup, file_stat

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


def heal(root: Path, log: Callable[[str], None] = lambda s: None) -> List[Tuple[str, str]]:
    """Drop committed shards whose files are missing or damaged, so their images count
    as not cached and are encoded again; returns [(shard, problem)].

    Every shard's two files are stat'ed; their checksums are read again only when their
    size or mtime changed since they were last confirmed (the lookup table keeps that),
    so a rerun does not re-read the features that are done. Then the lookup table is
    brought in line with the index.
    """
    root = Path(root)
    doc = load_index(root)
    lookup = Lookup(root)
    try:
        good, bad, confirm = [], [], []
        for r in doc["shards"]:
            confirmed = lookup.confirmed(r["name"]) or tuple(r.get("stat") or ()) or None
            problem, stats = _shard_problem(root, r, confirmed)
            if problem:
                bad.append((r, problem))
            else:
                good.append(r)
                if stats is not None:
                    confirm.append((r["name"], stats))
        if bad:
            doc["shards"] = good
            write_json(root / INDEX, doc)
            for r, problem in bad:
                for name in (r["name"], r["entries"]):
                    (root / SHARDS / name).unlink(missing_ok=True)
                log(
                    f"shard {r['name']} was damaged ({problem}): dropped, its {r['images']} "
                    f"image{'s' if r['images'] != 1 else ''} will be encoded again"
                )
        lookup.sync(good, lambda r: read_entries(root, r))
        for name, stats in confirm:
            lookup.confirm(name, stats)
    finally:
        lookup.close()
    return [(r["name"], problem) for r, problem in bad]


def _shard_problem(root: Path, r: dict, confirmed) -> Tuple[Optional[str], Optional[tuple]]:
    """(problem or None, new (size, mtime) stats to record when the checksums were read)."""
    files = ((r["name"], r["sha256"], r["bytes"]), (r["entries"], r["entries_sha256"], r.get("entries_bytes")))
    stats = []
    for name, _, size in files:
        st = file_stat(root / SHARDS / name)
        if st is None:
            return f"{name} missing", None
        if size is not None and st[0] != size:
            return f"{name} has {st[0]} bytes, the index records {size}", None
        stats += list(st)
    stats = tuple(stats)
    if confirmed == stats:
        return None, None
    for name, digest, size in files:
        problem = _check_file(root / SHARDS / name, digest, size)
        if problem:
            return f"{name}: {problem}", None
    return None, stats


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
    """Buffers encoded images and commits them as one shard on each ``flush``.

    The caller decides where shards end (``pipeline`` cuts them at fixed points of
    the work list, so that they do not depend on timing); ``shard_bytes`` is the
    target size it cuts at. Commit order: entries file, shard file (each temp +
    fsync + rename), then the journal (``index.json``, or this rank's journal in a
    distributed run), then the lookup table when one is given.
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
        lookup=None,
    ):
        self.lookup = lookup
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

    def flush(self) -> None:
        if not self.buffer:
            return
        self.seq += 1
        stem = f"r{self.rank:03d}-{self.seq:06d}"
        record, entries = self._write_shard(stem, self.buffer)
        # the files as they were checksummed: a rerun trusts them while this still holds
        folder = self.root / SHARDS
        record["stat"] = [*file_stat(folder / record["name"]), *file_stat(folder / record["entries"])]
        self.journal["shards"].append(record)
        write_json(self.journal_path, self.journal)
        if self.lookup is not None:
            self.lookup.add_shard(record, entries)
        self.shards_written += 1
        self.bytes_written += record["bytes"] + record["entries_bytes"]
        self.images_written += len(self.buffer)
        self.buffer, self.buffered = [], 0

    def _write_shard(self, stem: str, images: List[EncodedImage]) -> dict:
        folder = self.root / SHARDS
        tensors, entries, offset = [], {}, 0
        for im in images:
            spans = []  # per tile: [begin, end] of the values (+ of the scales) in the data
            for t, (values, scales) in enumerate(im.tiles):
                tensors.append((f"{im.key}.{t}", values, self.tag))
                span = [offset, offset + values.nbytes]
                offset += values.nbytes
                if scales is not None:
                    tensors.append((f"{im.key}.{t}.scale", scales, "F32"))
                    span += [offset, offset + scales.nbytes]
                    offset += scales.nbytes
                spans.append(span)
            entries[im.key] = {
                "grid": list(im.grid) if im.grid else None,
                "tiles": [list(g) for g in im.patch_grids],
                "source": im.source,
                "crc32": image_crc(im.tiles),
                "spans": spans,
            }
        entries_data = json.dumps({"format": FORMAT, "images": entries}, separators=(",", ":")).encode()
        write_atomic(folder / f"{stem}.json", entries_data)
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
        }, entries


def image_crc(tiles) -> int:
    """crc32 of an image's stored tensors in file order (values, then scales, per tile)."""
    crc = 0
    for values, scales in tiles:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(values)).cast("B"), crc)
        if scales is not None:
            crc = zlib.crc32(memoryview(np.ascontiguousarray(scales)).cast("B"), crc)
    return crc


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
    """A memory-mapped shard; CacheError names it when damaged. Its JSON header is
    parsed only for entries that do not say where their tensors lie."""

    def __init__(self, path: Path, expect: Optional[dict] = None):
        self.name = path.name
        try:
            self.file = open(path, "rb")
        except OSError as e:
            raise CacheError(f"{self._damaged()}: cannot open it ({e.strerror or e})") from None
        size = os.fstat(self.file.fileno()).st_size
        if expect is not None and expect.get("bytes") not in (None, size):
            self.file.close()
            raise CacheError(f"{self._damaged()}: {size} bytes, the index records {expect['bytes']}")
        self.map = mmap.mmap(self.file.fileno(), size, access=mmap.ACCESS_READ) if size else b""
        if size < 8 or 8 + struct.unpack("<Q", self.map[:8])[0] > size:
            self.close()
            raise CacheError(f"{self._damaged()}: truncated header")
        self.start = 8 + struct.unpack("<Q", self.map[:8])[0]
        self._header: Optional[dict] = None

    @property
    def header(self) -> dict:
        if self._header is None:
            try:
                self._header = read_safetensors_header(self.map)[0]
            except (CacheError, ValueError) as e:
                raise CacheError(f"{self._damaged()}: bad header ({e})") from None
        return self._header

    def _damaged(self) -> str:
        return f"feature cache shard {self.name} is damaged"

    def check_sha256(self, digest: str) -> None:
        """For entries written before per-image checksums: the whole shard, once."""
        if hashlib.sha256(self.map).hexdigest() != digest:
            raise CacheError(f"{self._damaged()}: checksum mismatch (rerun mlx_llama3v.embed to repair)")

    def span(self, a: int, b: int) -> memoryview:
        if not 0 <= a <= b <= len(self.map) - self.start:
            raise CacheError(f"{self._damaged()}: a tensor lies past the end of the file")
        return memoryview(self.map)[self.start + a : self.start + b]

    def raw(self, name: str) -> Tuple[memoryview, dict]:
        info = self.header.get(name)
        if info is None:
            raise CacheError(f"{self._damaged()}: tensor {name} is missing")
        return self.span(*info["data_offsets"]), info

    def tensor(self, name: str) -> mx.array:
        data, info = self.raw(name)
        return _to_mx(data, info)

    def close(self) -> None:
        if isinstance(self.map, mmap.mmap):
            self.map.close()
        self.file.close()


def _to_mx(data: memoryview, info: dict) -> mx.array:
    tag = info["dtype"]
    arr = np.frombuffer(data, dtype=NUMPY[tag]).reshape(info["shape"])
    out = mx.array(arr)
    return out.view(MLX[tag]) if tag == "BF16" else out


class FeatureCache:
    """Read a feature cache: ``cache[image] -> CachedImage``.

    ``image`` is a path, the image's bytes, or its sha256 hex key. A path is found
    through the path map ``embed`` wrote (checked by size and mtime when the file is
    there, used as it is when the file is gone) and hashed only when it is not in it.
    int8 features come back dequantized (float32); ``dtype`` casts every result.
    Opening reads the index and the lookup table (``lookup``), not a list of every
    image. Shards are memory-mapped on first use (at most ``max_open`` at once), only
    the requested tensors are read, and every image read is checked against its
    crc32 (shards written before per-image checksums: their sha256, once): damage
    raises ``CacheError`` naming the shard.
    """

    def __init__(self, path, dtype=None, max_open: int = 64):
        self.root = Path(path).expanduser()
        doc = load_index(self.root)
        if doc is None:
            raise CacheError(f"{self.root} is not a feature cache (no {INDEX})")
        self.index = doc
        self.settings: dict = doc["settings"]
        self.shards = committed_shards(self.root, doc)
        self.records = {r["name"]: r for r in self.shards}
        self.dtype, self.max_open = dtype, max_open
        self.lookup = open_lookup(self.root, self.shards)
        self._open: "OrderedDict[str, _Shard]" = OrderedDict()
        self._checked: set = set()
        self._lock = threading.Lock()

    @property
    def stored_dtype(self) -> str:
        return self.settings["dtype"]

    def key(self, image) -> str:
        if isinstance(image, (str, os.PathLike)) and not _is_hex_key(image):
            found = path_key(self.lookup, image)
            if found is not None:
                return found
        return image_key(image)

    def find(self, image) -> Optional[Tuple[str, dict]]:
        """(key, entry) of an image, None when it is not cached (no features read)."""
        try:
            key = self.key(image)
        except KeyError:
            return None
        found = self.lookup.find(key)
        return None if found is None else (key, found[1])

    def check_files(self) -> None:
        """CacheError naming the first shard or entry file that is missing or has the
        wrong size (a stat per file: cheap enough to run before training starts)."""
        for r in self.shards:
            for name, size in ((r["name"], r["bytes"]), (r["entries"], r.get("entries_bytes"))):
                st = file_stat(self.root / SHARDS / name)
                if st is None or (size is not None and st[0] != size):
                    what = "missing" if st is None else f"{st[0]} bytes, the index records {size}"
                    raise CacheError(
                        f"feature cache shard {name} is damaged: {what} "
                        "(rerun mlx_llama3v.embed to repair)"
                    )

    def __len__(self) -> int:
        return len(self.lookup)

    def __iter__(self) -> Iterator[str]:
        return self.lookup.keys()

    def keys(self):
        return self.lookup.keys()

    def __contains__(self, image) -> bool:
        return self.find(image) is not None

    def __getitem__(self, image) -> CachedImage:
        key = self.key(image)
        found = self.lookup.find(key)
        if found is None:
            raise KeyError(
                f"{image if isinstance(image, (str, os.PathLike)) else key}: not in the cache"
            )
        name, entry = found
        with self._lock:
            shard = self._shard(name)
            if entry.get("crc32") is None and name not in self._checked:
                # written before per-image checksums: check the whole shard, once
                shard.check_sha256(self.records[name]["sha256"])
                self._checked.add(name)
            tiles = self._read(shard, key, entry)
        grid = tuple(entry["grid"]) if entry["grid"] else None
        return CachedImage(key, tiles, grid, [tuple(g) for g in entry["tiles"]])

    def get(self, image, default=None):
        try:
            return self[image]
        except KeyError:
            return default

    def _read(self, shard: _Shard, key: str, entry: dict) -> List[mx.array]:
        raws, crc = [], 0
        spans = entry.get("spans")
        tag = TAGS[self.stored_dtype]
        for t, (rows, cols) in enumerate(entry["tiles"]):
            if spans is not None:  # where the bytes lie is in the entry: no header needed
                span = spans[t]
                values = (shard.span(span[0], span[1]), {"dtype": tag, "shape": [rows * cols, -1]})
                scales = None
                if len(span) == 4:
                    scales = (shard.span(span[2], span[3]), {"dtype": "F32", "shape": [rows * cols, 1]})
            else:
                values = shard.raw(f"{key}.{t}")
                scale_name = f"{key}.{t}.scale"
                scales = shard.raw(scale_name) if scale_name in shard.header else None
            for part in (values, scales):
                if part is not None:
                    crc = zlib.crc32(part[0], crc)
            raws.append((values, scales))
        if entry.get("crc32") is not None and crc != entry["crc32"]:
            raise CacheError(
                f"feature cache shard {shard.name} is damaged: the features of image {key} "
                "fail their checksum (rerun mlx_llama3v.embed to repair)"
            )
        tiles = []
        for values, scales in raws:
            out = _to_mx(*values)
            if scales is not None:
                out = out.astype(mx.float32) * _to_mx(*scales)
            tiles.append(out if self.dtype is None else out.astype(self.dtype))
        return tiles

    def _shard(self, name: str) -> _Shard:
        shard = self._open.pop(name, None)
        if shard is None:
            shard = _Shard(self.root / SHARDS / name, self.records.get(name))
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
            self.lookup.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_hex_key(image) -> bool:
    text = os.fspath(image)
    return isinstance(text, str) and len(text) == 64 and set(text) <= _HEX


def path_key(lookup: Lookup, path) -> Optional[str]:
    """The key the path map holds for ``path``: used as it is when the file is gone,
    after a size + mtime check when it is there; None when unknown or changed."""
    p = normalised_path(path)
    known = lookup.path_entry(p)
    if known is None:
        return None
    st = file_stat(p)
    if st is None or st == known[:2]:
        return known[2]
    return None


def normalised_path(path) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def read_entries(root: Path, record: dict) -> dict:
    """The per-image entries of a committed shard (CacheError when unreadable)."""
    path = Path(root) / SHARDS / record["entries"]
    try:
        doc = read_json(path)
        return doc["images"]
    except (OSError, KeyError, TypeError) as e:
        raise CacheError(f"feature cache entries {path.name} cannot be read ({e})") from None


def open_lookup(root: Path, records: Sequence[dict], writable: Optional[bool] = None) -> Lookup:
    """The lookup table of ``root``, brought in line with ``records``."""
    writable = os.access(root, os.W_OK) if writable is None else writable
    lookup = Lookup(root, writable=writable)
    try:
        lookup.sync(records, lambda r: read_entries(root, r))
    except sqlite3.OperationalError:  # read-only file on writable storage: rebuild in memory
        lookup.close()
        lookup = Lookup(root, writable=False)
        lookup.db.close()
        lookup.db = sqlite3.connect(":memory:", check_same_thread=False)
        lookup.db.executescript(_LOOKUP_SCHEMA)
        lookup.sync(records, lambda r: read_entries(root, r))
    return lookup


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
