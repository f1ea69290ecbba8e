"""``embed()``: one run of the feature-cache builder, from image source to merged index.

Steps (every rank of a distributed run does each one):

1. list the images (``sources``) and load the model's vision tower;
2. rank 0 locks the output folder, checks its settings match, merges journals and
   removes files of interrupted runs;
3. hash the images (rank r: every n-th), exchange keys, drop duplicates and images
   already cached, and take this rank's share (``distributed``);
4. run the pipeline (decode threads -> batched tower -> shard writer);
5. barrier; rank 0 merges the per-rank journals into ``index.json`` and writes
   ``report.json``.

Errors the user can fix raise ``EmbedError`` (one line).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models.vision import VisionTower
from ..processing import resolve_processor_config
from . import cache as cache_mod
from .cache import (
    REPORT,
    CacheError,
    ShardWriter,
    committed_shards,
    journal_name,
    load_index,
    normalised_path,
)
from .codec import ErrorStats, bytes_per_tile, check_dtype
from ..distributed import Ranks
from .distributed import exchange_digests, owners, share
from .lookup import Lookup, file_stat
from .pipeline import BackgroundWriter, BatchEncoder, FeatureOverflow, TileBatcher, WorkItem, prepared
from .sources import SourceError, describe, list_images
from ..errors import UserError, one_line
from ..files import output_error, writing

# processor_config keys that change the pixels the tower sees (prompt keys do not)
PREPROCESSING_KEYS = (
    "family",
    "image_size",
    "patch_size",
    "slice",
    "max_slices",
    "mean",
    "std",
    "pad_color",
)


class EmbedError(UserError):
    """A problem the user can fix; the message is one line."""


@dataclass
class Summary:
    """What a run did (counts over every rank) and what the cache now holds."""

    listed: int = 0
    unique: int = 0
    duplicates: int = 0
    cached: int = 0
    encoded: int = 0
    failed: int = 0
    failures: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    work_seconds: float = 0.0  # after the model is loaded: hashing, encoding, writing, merging
    tower_seconds: float = 0.0  # of which rank 0's tower was busy
    cache_images: int = 0
    cache_bytes: int = 0
    cache_shards: int = 0
    error: dict = field(default_factory=dict)
    dtype: str = ""
    ranks: int = 1
    report: Optional[str] = None

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.work_seconds if self.work_seconds else 0.0

    @property
    def tower_busy(self) -> float:
        """Share of the run the tower was computing: the pipeline's efficiency."""
        return self.tower_seconds / self.work_seconds if self.work_seconds else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.cache_bytes / self.cache_images if self.cache_images else 0.0


# ------------------------------------------------------------------ model
def load_vision(model) -> Tuple[VisionTower, dict, str, str]:
    """(tower, processor_config, family, name) from a model folder/repo or a loaded Model."""
    if isinstance(model, (str, os.PathLike)):
        name = str(model)
        path = Path(name).expanduser()
        looks_like_repo = (
            not path.is_absolute() and name.count("/") == 1 and not name.startswith(".")
        )
        if not path.exists() and not looks_like_repo:
            raise EmbedError(f"model {name} not found")
        from ..loading import load

        try:
            model, _ = load(name, lazy=True)  # lazy: the language model is never read
        except Exception as e:  # loader errors come in many types; one line for the user
            raise EmbedError(
                f"cannot load model {name} ({one_line(e)})"
            ) from None
    else:
        name = type(model).__name__
    config = model.config
    return (
        model.vision_tower,
        resolve_processor_config(config.processor_config, config.family),
        config.family,
        name,
    )


def compute_tower(tower: VisionTower) -> VisionTower:
    """The tower in float32 on the CPU (MLX's CPU half-precision matmuls are slow);
    as it is elsewhere. Weights stay untouched on the given model."""
    params = tree_flatten(tower.parameters())
    if mx.default_device() != mx.cpu or all(v.dtype == mx.float32 for _, v in params):
        mx.eval(tower.parameters())
        return tower
    out = VisionTower(tower.config)
    out.load_weights([(k, v.astype(mx.float32)) for k, v in params])
    out.eval()
    mx.eval(out.parameters())
    return out


def fingerprint(tower: VisionTower, samples: int = 1024) -> str:
    """sha256 over every weight's name, shape and ``samples`` evenly spaced values."""
    h = hashlib.sha256()
    for name, v in sorted(tree_flatten(tower.parameters())):
        flat = v.reshape(-1)
        idx = mx.array(np.linspace(0, flat.size - 1, min(samples, flat.size)).astype(np.int64))
        h.update(f"{name}{tuple(v.shape)}".encode())
        h.update(np.asarray(flat[idx].astype(mx.float32)).tobytes())
    return h.hexdigest()


def make_settings(tower: VisionTower, processor_config: dict, family: str, dtype: str) -> dict:
    settings = {
        "feature": "vision tower output, before the projector",
        "key": "sha256 of the image file bytes",
        "dtype": dtype,
        "family": family,
        "vision_config": asdict(tower.config),
        "preprocessing": {k: processor_config.get(k) for k in PREPROCESSING_KEYS},
        "vision_fingerprint": fingerprint(tower),
    }
    return json.loads(json.dumps(settings))  # tuples -> lists, as read back from the index


# ------------------------------------------------------------------ steps
@contextmanager
def _no_empty_cache_left(root: Path, fresh: bool):
    """A run that created the cache (under its lock) and stops before committing any
    image removes it again."""
    try:
        yield
    except BaseException:
        try:
            if fresh and root.is_dir() and not committed_shards(root):
                shutil.rmtree(root, ignore_errors=True)
        except (CacheError, OSError, ValueError):
            pass
        raise


@contextmanager
def locked(root: Path, enabled: bool):
    """Hold an exclusive lock on ``root/.lock`` (one writer per cache folder)."""
    if not enabled:
        yield
        return
    try:
        import fcntl
    except ImportError:  # no POSIX locks: run unguarded
        yield
        return
    with writing(root):
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / ".lock", "w")
    with lock as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EmbedError(f"another mlx_llama3v.embed run is writing to {root}") from None
        yield


def open_cache(
    root: Path, settings: dict, model_name: str, group: Ranks, log=lambda s: None
) -> List[dict]:
    """Rank 0 creates/checks the index, drops damaged shards (``heal``) and cleans up;
    every rank gets the shard records."""
    problem = None
    if group.rank == 0:
        try:
            cache_mod.open_for_writing(root, settings, model_name)
            cache_mod.merge_journals(root)
            cache_mod.heal(root, log)
            cache_mod.remove_orphans(root, committed_shards(root))
            for stale in root.glob("report.rank*.json"):  # from an interrupted distributed run
                stale.unlink()
        except CacheError as e:
            problem = str(e)
        except OSError as e:
            problem = str(output_error(root, e))
    if not group.agree(problem is None):
        raise EmbedError(problem or "rank 0 could not open the output folder")
    return committed_shards(root)


def cached_keys(lookup: Lookup) -> set:
    """Keys of every cached image, from the lookup table (no entry file is read)."""
    return set(lookup.keys())


def hash_file(path: Path, known=None) -> Tuple[Optional[bytes], Optional[str], Optional[tuple]]:
    """(sha256, error, (size, mtime_ns) before reading); ``known`` = (size, mtime_ns,
    key) from the path map, used instead of reading when the file still matches it."""
    if not isinstance(path, Path):  # an image inside a dataset
        try:
            return hashlib.sha256(path.read_bytes()).digest(), None, None
        except Exception as e:  # datasets / pyarrow errors come in many types
            return None, f"{path}: cannot read the image ({e})", None
    st = file_stat(path)
    if known is not None and st is not None and st == tuple(known[:2]):
        return bytes.fromhex(known[2]), None, st
    digest, error = _hash_file(path)
    return digest, error, st


def _hash_file(path: Path) -> Tuple[Optional[bytes], Optional[str]]:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.digest(), None
    except FileNotFoundError:
        return None, f"{path}: file not found"
    except IsADirectoryError:
        return None, f"{path}: is a directory, not an image file"
    except OSError as e:
        return None, f"{path}: cannot read file ({e.strerror or e})"


def hash_all(paths: Sequence[Path], group: Ranks, workers: int, progress: bool, lookup=None):
    """(key or None per path, [(path, error)] of this rank's unreadable files).

    Files the path map of ``lookup`` knows with the same size and mtime are not read.
    Rank 0 then writes the path map for every readable path.
    """
    index = list(share(len(paths), group.rank, group.size))
    mine = [paths[i] for i in index]
    files = [normalised_path(p) for p in mine if isinstance(p, Path)]
    known = lookup.path_entries(files) if lookup else {}
    work = lambda p: hash_file(p, known.get(normalised_path(p)) if isinstance(p, Path) else None)  # noqa: E731
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            _bar(pool.map(work, mine), len(mine), "hashing", progress and len(mine) > 500)
        )
    failures = [(str(p), err) for p, (_, err, _) in zip(mine, results) if err]
    digests = exchange_digests(group, len(paths), [d for d, _, _ in results])
    keys = [d.hex() if d is not None else None for d in digests]
    if group.rank == 0 and lookup is not None:
        stats = {i: st for i, (_, _, st) in zip(index, results)}
        rows = []
        for i, (path, key) in enumerate(zip(paths, keys)):
            if not isinstance(path, Path):
                continue
            st = stats[i] if i in stats else file_stat(path)  # other ranks' share: stat here
            if key is not None and st is not None:
                name = normalised_path(path)
                if known.get(name) != (*st, key):  # only what is new or changed
                    rows.append((name, st[0], st[1], key))
        lookup.put_paths(rows)
    return keys, failures


def _bar(iterable, total: int, desc: str, enabled: bool, **kw):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", dynamic_ncols=True, **kw)


def encode_items(
    items: List[WorkItem],
    tower,
    processor_config: dict,
    writer: ShardWriter,
    *,
    dtype: str,
    batch_size: int,
    workers: int,
    strict: bool,
    progress: bool,
    desc: str,
    after_batch: Optional[Callable[[], None]] = None,
) -> Tuple[int, List[Tuple[str, str]], float]:
    """Run the pipeline over ``items``; (images encoded, failures, seconds the tower worked)."""
    failures: List[Tuple[str, str]] = []
    background = BackgroundWriter(writer)
    bar = _bar(None, len(items), desc, progress, smoothing=0.1)
    encoded = [0]

    def emit(image) -> None:
        background.put(image)
        encoded[0] += 1
        if bar is not None:
            bar.update(1)

    encoder = BatchEncoder(tower, dtype, emit, after_batch)
    batcher = TileBatcher(batch_size, max_tiles=4 * batch_size)
    # Shards end at fixed points of the work list (after the image that brings the
    # stored bytes to the target), and the batcher is drained there: which tiles share
    # a tower batch, and so every stored bit, depends on the inputs alone, never on
    # decode timing, and a rerun after a kill rebuilds the very shards it lost.
    patch, width = tower.config.patch_size, tower.config.hidden_size
    chunk_bytes = 0
    stop = None
    try:
        for p in prepared(
            items, processor_config, workers, prefetch=max(2 * batch_size, 4 * workers)
        ):
            if p.error:
                failures.append((str(p.item.path), p.error))
                if bar is not None:
                    bar.update(1)
                if strict:
                    stop = EmbedError(f"{p.error} (--strict)")
                    break
                continue
            batcher.add(encoder.start(p), p.tiles)
            for refs in batcher.ready():
                encoder.encode(refs)
            chunk_bytes += sum(
                bytes_per_tile((t.shape[0] // patch) * (t.shape[1] // patch), width, dtype)
                for t in p.tiles
            )
            if chunk_bytes >= writer.shard_bytes:
                for refs in batcher.drain():
                    encoder.encode(refs)
                background.end_shard()
                chunk_bytes = 0
        for refs in batcher.drain():  # with --strict too: keep what was decoded before
            encoder.encode(refs)
    except FeatureOverflow as e:
        raise EmbedError(str(e)) from None
    finally:
        # commit what is finished, whatever stopped the loop (Ctrl-C, SIGTERM, --strict)
        if bar is not None:
            bar.close()
        background.close()
    if stop is not None:
        raise stop
    return encoded[0], failures, encoder.busy


# ------------------------------------------------------------------ the run
@dataclass
class Plan:
    """What this rank encodes, and the counts over every listed image."""

    todo: List[WorkItem]
    listed: int
    distinct: int
    duplicates: int
    cached: int
    failures: List[Tuple[str, str]]

    def describe(self, images, ranks: int) -> str:
        return (
            f"{describe(images)}: {self.listed} images, {self.distinct} distinct, "
            f"{self.duplicates} duplicates, {self.cached} already cached; "
            f"{self.distinct - self.cached} to encode"
            + (f" over {ranks} ranks" if ranks > 1 else "")
        )


def plan_work(
    paths, done: set, group: Ranks, workers: int, strict: bool, progress: bool, lookup=None
) -> Plan:
    """Hash every image (split over ranks), drop duplicates and cached ones, take my share."""
    keys, failures = hash_all(paths, group, workers, progress and group.rank == 0, lookup)
    if strict and failures:
        raise EmbedError(f"{failures[0][1]} (--strict)")
    first = owners(keys, group.size)
    todo = [
        WorkItem(k, paths[i])
        for k, (i, rank) in first.items()
        if rank == group.rank and k not in done
    ]
    readable = sum(k is not None for k in keys)
    cached = sum(1 for k in first if k in done)
    return Plan(todo, len(paths), len(first), readable - len(first), cached, failures)


def make_writer(
    root: Path,
    group: Ranks,
    settings: dict,
    model_name: str,
    dtype: str,
    shard_size_mb: float,
    midway: Optional[Callable[[], None]] = None,
    lookup=None,
) -> ShardWriter:
    """A writer committing to index.json, or, in a distributed run, to this rank's journal."""
    if group.size == 1:
        journal = load_index(root)
    else:
        journal = dict(cache_mod.new_index(settings, model_name), rank=group.rank)
    return ShardWriter(
        root,
        journal,
        root / journal_name(group.rank, group.size),
        dtype,
        rank=group.rank,
        shard_bytes=int(shard_size_mb * 1e6),
        midway=midway,
        lookup=lookup if group.size == 1 else None,  # ranks' shards enter it at the merge
    )


def _check_options(dtype: str, batch_size: int, shard_size_mb: float) -> None:
    try:
        check_dtype(dtype)
    except ValueError as e:
        raise EmbedError(str(e)) from None
    if batch_size < 1:
        raise EmbedError(f"--batch-size must be at least 1, got {batch_size}")
    if shard_size_mb <= 0:
        raise EmbedError(f"--shard-size must be positive, got {shard_size_mb}")


def _list(images, image_root) -> List[Path]:
    try:
        return list_images(images, image_root)
    except SourceError as e:
        raise EmbedError(str(e)) from None


def embed(
    model: Union[str, os.PathLike, object],
    images: Union[str, os.PathLike],
    out: Union[str, os.PathLike],
    *,
    image_root: Optional[str] = None,
    dtype: str = "float16",
    batch_size: int = 8,
    workers: Optional[int] = None,
    shard_size_mb: float = 512.0,
    strict: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
    after_batch: Optional[Callable[[], None]] = None,
    midway: Optional[Callable[[], None]] = None,
) -> Summary:
    """Encode every image of ``images`` into the cache at ``out`` (see the module doc).

    ``model``: a converted model folder / repo id, or a loaded ``Model``. ``workers``:
    decoding threads (default: the cores, at most 8). ``after_batch`` runs after each
    encoded batch and ``midway`` in the middle of each shard write (tests pause there
    to interrupt a run at a chosen moment).
    """
    t0 = time.perf_counter()
    _check_options(dtype, batch_size, shard_size_mb)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    group = Ranks()
    paths = _list(images, image_root)
    tower, pcfg, family, model_name = load_vision(model)
    tower = compute_tower(tower)
    settings = make_settings(tower, pcfg, family, dtype)
    root = Path(out).expanduser()
    if group.rank == 0:
        try:
            cache_mod.check_out_folder(root)  # before the lock file is made in it
        except CacheError as e:
            raise EmbedError(str(e)) from None
    t_work = time.perf_counter()
    fresh = group.rank == 0 and not root.exists()
    with locked(root, group.rank == 0), _no_empty_cache_left(root, fresh), ExitStack() as stack:
        open_cache(root, settings, model_name, group, log)
        lookup = Lookup(root, writable=group.rank == 0)
        stack.callback(lookup.close)
        plan = plan_work(paths, cached_keys(lookup), group, workers, strict, progress, lookup)
        if group.rank == 0:
            log(plan.describe(images, group.size))
        writer = make_writer(
            root, group, settings, model_name, dtype, shard_size_mb, midway, lookup
        )
        desc = "embedding" if group.size == 1 else f"embedding (rank 0 of {group.size})"
        encoded, bad, busy = encode_items(
            plan.todo,
            tower,
            pcfg,
            writer,
            dtype=dtype,
            batch_size=batch_size,
            workers=workers,
            strict=strict,
            progress=progress and group.rank == 0,
            desc=desc,
            after_batch=after_batch,
        )
        summary = _finish(root, group, plan, encoded, plan.failures + bad, dtype, lookup)
        summary.work_seconds = time.perf_counter() - t_work
        summary.tower_seconds = busy
        summary.seconds = time.perf_counter() - t0
        if group.rank == 0:
            _write_report(root, summary, images, model_name)
        group.barrier()
    return summary


def _finish(
    root: Path, group: Ranks, plan: Plan, encoded: int, failures, dtype: str, lookup=None
) -> Summary:
    """Counts over every rank; on rank 0, the merged index and the cache totals."""
    _write_rank_report(root, group, failures)
    counts = group.all_sum([encoded, len(failures)])  # also: every rank has committed
    summary = Summary(
        listed=plan.listed,
        unique=plan.distinct,
        duplicates=plan.duplicates,
        cached=plan.cached,
        encoded=counts[0],
        failed=counts[1],
        dtype=dtype,
        ranks=group.size,
    )
    if group.rank == 0:
        cache_mod.merge_journals(root)
        if lookup is not None:
            lookup.sync(committed_shards(root), lambda r: cache_mod.read_entries(root, r))
        summary.failures = _gather_failures(root, group, failures)
        summary.report = str(root / REPORT)
        _fill_cache_totals(summary, root)
    return summary


def _write_rank_report(root: Path, group: Ranks, failures) -> None:
    if group.size > 1:
        cache_mod.write_json(root / f"report.rank{group.rank}.json", {"failures": failures})


def _gather_failures(root: Path, group: Ranks, mine) -> List[Tuple[str, str]]:
    if group.size == 1:
        return list(mine)
    out = []
    for r in range(group.size):
        path = root / f"report.rank{r}.json"
        out += [tuple(f) for f in cache_mod.read_json(path)["failures"]]
        path.unlink()
    return sorted(out)


def _fill_cache_totals(summary: Summary, root: Path) -> None:
    records = committed_shards(root)
    summary.cache_shards = len(records)
    summary.cache_images = sum(r["images"] for r in records)
    summary.cache_bytes = sum(r["bytes"] + r.get("entries_bytes", 0) for r in records)
    stats = ErrorStats()
    for r in records:
        stats.add(ErrorStats.from_dict(r.get("error")))
    summary.error = stats.summary()


def _write_report(root: Path, summary: Summary, images, model_name: str) -> None:
    report = {
        "model": model_name,
        "images": str(images),
        "listed": summary.listed,
        "distinct": summary.unique,
        "duplicates": summary.duplicates,
        "already_cached": summary.cached,
        "encoded": summary.encoded,
        "skipped": summary.failed,
        "skipped_images": [{"path": p, "error": e} for p, e in summary.failures],
        "seconds": round(summary.seconds, 3),
        "work_seconds": round(summary.work_seconds, 3),
        "tower_busy": round(summary.tower_busy, 4),
        "images_per_second": round(summary.images_per_second, 3),
        "ranks": summary.ranks,
        "dtype": summary.dtype,
        "cache": {
            "images": summary.cache_images,
            "shards": summary.cache_shards,
            "bytes": summary.cache_bytes,
            "bytes_per_image": round(summary.bytes_per_image, 1),
            "error_vs_float32": summary.error,
        },
    }
    cache_mod.write_json(root / REPORT, report)
