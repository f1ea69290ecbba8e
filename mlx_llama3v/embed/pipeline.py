"""The encoding pipeline: decode on threads, batch equal tiles, encode, write in the background.

Three stages overlap:

1. ``prepared``: a thread pool reads each image file, checks its bytes still hash to
   the key, decodes and preprocesses it into normalised tiles (PIL and numpy release
   the GIL). Results come back in input order, at most ``prefetch`` ahead.
2. ``TileBatcher`` + ``BatchEncoder`` (main thread): tiles wait in buckets of equal shape
   until ``batch_size`` of one shape are there, then go through
   ``VisionTower.encode`` as one batch (no padding; shapes mix only to bound memory
   and at the end of each shard), are cast to the storage dtype on the device and
   their storage error is measured. Results come back in input order and shards end
   at fixed points of the work list, so the batches, and every stored byte, follow
   from the inputs alone (not from decode timing, load or interruptions).
3. ``BackgroundWriter``: a thread that hands finished images to the ``ShardWriter``
   (serialising, fsync and rename happen off the main thread).

The main thread blocks in ``mx.eval`` (which releases the GIL) while the decode and
writer threads run, so decoding and I/O hide behind the tower.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..processing import ImageError, preprocess_image
from .cache import EncodedImage, ShardWriter
from .codec import ErrorStats, error_terms, stats_from, store, to_numpy

@dataclass
class WorkItem:
    key: str
    path: Path


@dataclass
class Prepared:
    """A decoded image's tiles, or why it could not be read."""

    item: WorkItem
    tiles: Optional[List[np.ndarray]] = None
    grid: Optional[Tuple[int, int]] = None
    error: Optional[str] = None


def prepare(item: WorkItem, processor_config: dict) -> Prepared:
    try:
        data = item.path.read_bytes()
    except OSError as e:
        return Prepared(item, error=f"{item.path}: cannot read file ({e.strerror or e})")
    except Exception as e:  # an image inside a dataset: datasets / pyarrow errors
        return Prepared(item, error=f"{item.path}: cannot read the image ({e})")
    if hashlib.sha256(data).hexdigest() != item.key:
        return Prepared(item, error=f"{item.path}: file changed while the command ran")
    src = io.BytesIO(data)
    src.name = str(item.path)  # load_image names the image by it in errors
    try:
        processed = preprocess_image(src, processor_config)
    except ImageError as e:
        return Prepared(item, error=str(e))
    except Exception as e:  # a decoder bug on odd data must not stop a long run
        return Prepared(item, error=f"{item.path}: cannot preprocess ({type(e).__name__}: {e})")
    return Prepared(item, processed.tiles, processed.grid)


def prepared(
    items: Iterable[WorkItem], processor_config: dict, workers: int, prefetch: int
) -> Iterator[Prepared]:
    """``prepare`` over ``items`` on ``workers`` threads, yielded in order."""
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="embed-decode")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(prepare, item, processor_config))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # also when the consumer stops early: drop what has not started
        pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------ batching
@dataclass
class _Pending:
    """An image whose tiles are being encoded."""

    prepared: Prepared
    tiles: list
    patch_grids: list
    stats: ErrorStats = field(default_factory=ErrorStats)
    left: int = 0


@dataclass
class TileRef:
    image: _Pending
    index: int
    pixels: Optional[np.ndarray]


class TileBatcher:
    """Buckets tiles by shape; hands out batches of ``batch_size`` equal tiles.

    When more than ``max_tiles`` wait (images of many different tile shapes, as with
    MiniCPM's slicing), and at the end, batches are filled from the fullest buckets:
    shapes then mix (padded and masked), which bounds memory and keeps batches full.
    """

    def __init__(self, batch_size: int, max_tiles: int):
        self.batch_size, self.max_tiles = batch_size, max(max_tiles, batch_size)
        self.buckets: Dict[Tuple[int, ...], List[TileRef]] = {}
        self.waiting = 0

    def add(self, image: _Pending, tiles: List[np.ndarray]) -> None:
        for i, t in enumerate(tiles):
            self.buckets.setdefault(t.shape, []).append(TileRef(image, i, t))
        self.waiting += len(tiles)

    def ready(self) -> Iterator[List[TileRef]]:
        for shape in list(self.buckets):
            while len(self.buckets.get(shape, ())) >= self.batch_size:
                yield self._take(shape, self.batch_size)
        while self.waiting > self.max_tiles:
            yield self._mixed()

    def drain(self) -> Iterator[List[TileRef]]:
        while self.waiting:
            yield self._mixed()

    def _mixed(self) -> List[TileRef]:
        batch: List[TileRef] = []
        while len(batch) < self.batch_size and self.buckets:
            shape = max(self.buckets, key=lambda s: len(self.buckets[s]))
            batch += self._take(shape, self.batch_size - len(batch))
        return batch

    def _take(self, shape, n: int) -> List[TileRef]:
        bucket = self.buckets[shape]
        batch, rest = bucket[:n], bucket[n:]
        if rest:
            self.buckets[shape] = rest
        else:
            del self.buckets[shape]
        self.waiting -= len(batch)
        return batch


# ------------------------------------------------------------------ writer thread
class BackgroundWriter:
    """Runs ``ShardWriter.add`` on a thread; ``end_shard`` commits what it was given so
    far as one shard; ``close`` commits the rest and re-raises the thread's error."""

    _DONE = object()
    _FLUSH = object()

    def __init__(self, writer: ShardWriter, max_images: int = 64):
        self.writer = writer
        self.queue: "queue.Queue" = queue.Queue(maxsize=max_images)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name="embed-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            image = self.queue.get()
            if image is self._DONE:
                break
            if self.error is None:
                try:
                    if image is self._FLUSH:
                        self.writer.flush()
                    else:
                        self.writer.add(image)
                except BaseException as e:  # noqa: BLE001  (re-raised on the main thread)
                    self.error = e
        if self.error is None:
            try:
                self.writer.flush()
            except BaseException as e:  # noqa: BLE001
                self.error = e

    def put(self, image: EncodedImage) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(image)

    def end_shard(self) -> None:
        self.put(self._FLUSH)

    def close(self) -> None:
        self.queue.put(self._DONE)
        self.thread.join()
        if self.error is not None:
            raise self.error


# ------------------------------------------------------------------ encoding
class FeatureOverflow(RuntimeError):
    """Finite features became infinite in the storage dtype."""


class BatchEncoder:
    """Encodes tile batches; emits each image once all its tiles are done."""

    def __init__(
        self,
        tower,
        dtype: str,
        emit: Callable[[EncodedImage], None],
        after_batch: Optional[Callable[[], None]] = None,
    ):
        self.tower, self.dtype, self.emit = tower, dtype, emit
        self.after_batch = after_batch  # called after each encoded batch (tests pause there)
        self.busy = 0.0  # seconds in the tower and the storage casts

    def start(self, p: Prepared) -> _Pending:
        n = len(p.tiles)
        return _Pending(p, [None] * n, [None] * n, left=n)

    def encode(self, refs: List[TileRef]) -> None:
        pixels = [r.pixels for r in refs]
        for r in refs:
            r.pixels = None  # only the batch holds them now
        start = time.perf_counter()
        groups = []
        for group, batch, feats in self.tower.encode(pixels):
            values, scales = store(feats, self.dtype)
            valid = mx.array(batch.valid()) if batch.padded else None
            groups.append((group, batch, values, scales, error_terms(feats, values, scales, valid)))
        mx.eval([g[2:] for g in groups])  # one sync for the casts and error terms of every group
        self.busy += time.perf_counter() - start
        for group, batch, values, scales, terms in groups:
            self._collect(refs, group, batch, values, scales, terms)
        if self.after_batch is not None:
            self.after_batch()

    def _collect(self, refs, group, batch, values, scales, terms) -> None:
        v, t = to_numpy(values), np.asarray(terms)
        s = None if scales is None else to_numpy(scales)
        for j, i in enumerate(group):
            n, ref = batch.lengths[j], refs[i]
            image = ref.image
            image.tiles[ref.index] = (v[j, :n], None if s is None else s[j, :n])
            image.patch_grids[ref.index] = tuple(batch.grids[j])
            image.stats.add(stats_from(t[j]))
            image.left -= 1
            if image.left == 0:
                self.emit(self._finish(image))

    def _finish(self, image: _Pending) -> EncodedImage:
        p, stats = image.prepared, image.stats
        if not np.isfinite(stats.max_abs_err) and np.isfinite(stats.max_abs):
            raise FeatureOverflow(
                f"features of {p.item.path} overflow {self.dtype}; use --dtype bfloat16 or float32"
            )
        return EncodedImage(
            p.item.key, image.tiles, image.patch_grids, p.grid, str(p.item.path), stats
        )
