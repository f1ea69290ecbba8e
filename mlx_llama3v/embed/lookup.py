"""The feature cache's lookup table: image key -> shard and entry, image path -> key.

``lookup.sqlite`` (SQLite from the standard library) sits next to ``index.json``. It
is derived data: the index and the shards' entry files stay the record of what is
cached, and the table is brought in line with them when a cache is opened (shards
it does not know are added from their entry files, shards the index no longer names
are dropped), so a lost or damaged table is rebuilt, never trusted blindly. Opening
is a few queries whatever the size (no per-image dict is built), a lookup one
B-tree search.

Tables:

- ``shards``: name, and the (size, mtime) of the shard and entry files when their
  checksums were last confirmed, so a rerun re-reads only what changed since;
- ``images``: sha256 key (32 bytes) -> shard and entry (slice grid, tile patch grids,
  crc32, where each tile's bytes lie in the shard: read without parsing its header);
- ``paths``: absolute image path -> (size, mtime_ns, key), written by ``embed``, so
  training and reruns find an image's key without hashing the file (and without the
  file at all once it is gone); a file whose size or mtime changed is hashed again.

A cache on read-only storage gets the table in memory instead.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

LOOKUP = "lookup.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS shards(
    id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
    size INTEGER, mtime_ns INTEGER, entries_size INTEGER, entries_mtime_ns INTEGER);
CREATE TABLE IF NOT EXISTS images(
    key BLOB PRIMARY KEY, shard INTEGER NOT NULL, entry TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paths(
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, key BLOB NOT NULL
) WITHOUT ROWID;
"""


class Lookup:
    """The lookup table of the cache at ``root`` (see the module doc)."""

    def __init__(self, root: Path, writable: bool = True):
        self.root = Path(root)
        self.path = self.root / LOOKUP
        self.db = self._connect(writable)
        self._names: Optional[dict] = None

    def _connect(self, writable: bool) -> sqlite3.Connection:
        db = self._open(writable)
        # random lookups over a large table: read it through a memory map, not read() calls
        db.execute("PRAGMA mmap_size = 1073741824")
        db.execute("PRAGMA cache_size = -32768")
        return db

    def _open(self, writable: bool) -> sqlite3.Connection:
        if writable:
            try:
                db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
                db.executescript(_SCHEMA)
                db.execute("SELECT count(*) FROM shards").fetchone()
                return db
            except sqlite3.DatabaseError:  # damaged: it is derived data, so rebuild it
                try:
                    db.close()
                    self.path.unlink()
                    return self._open(True)
                except OSError:
                    pass
            except OSError:
                pass
        elif self.path.exists():
            try:
                db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, timeout=60, check_same_thread=False
                )
                db.execute("SELECT count(*) FROM shards").fetchone()
                return db
            except sqlite3.DatabaseError:
                pass
        db = sqlite3.connect(":memory:", check_same_thread=False)  # read-only storage
        db.executescript(_SCHEMA)
        return db

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------- shards
    def shard_names(self) -> dict:
        """shard id -> name."""
        if self._names is None:
            self._names = dict(self.db.execute("SELECT id, name FROM shards"))
        return self._names

    def sync(self, records: Sequence[dict], read_entries) -> int:
        """Make the table hold exactly the images of ``records``; returns shards added.

        ``read_entries(record) -> {key hex: entry}`` reads a shard's entry file.
        """
        wanted = {r["name"]: r for r in records}
        if set(self.shard_names().values()) == set(wanted):
            return 0
        added = 0
        # the write lock first, then a fresh look: readers opening the same cache at once
        # (the ranks of a training run) must not both insert the same shard
        self.db.execute("BEGIN IMMEDIATE")
        try:
            known = {name: sid for sid, name in self.db.execute("SELECT id, name FROM shards")}
            for name, sid in known.items():
                if name not in wanted:
                    self.db.execute("DELETE FROM images WHERE shard = ?", (sid,))
                    self.db.execute("DELETE FROM shards WHERE id = ?", (sid,))
            for name, record in wanted.items():
                if name not in known:
                    self._insert(record, read_entries(record))
                    added += 1
            self.db.commit()
        except BaseException:
            self.db.rollback()
            raise
        finally:
            self._names = None
        return added

    def add_shard(self, record: dict, entries: dict) -> None:
        with self.db:
            self._insert(record, entries)
        self._names = None

    def _insert(self, record: dict, entries: dict) -> None:
        cur = self.db.execute("INSERT INTO shards(name) VALUES (?)", (record["name"],))
        sid = cur.lastrowid
        # the first shard to store an image wins, as when the index is read in order
        self.db.executemany(
            "INSERT OR IGNORE INTO images VALUES (?, ?, ?)",
            (
                (bytes.fromhex(key), sid, json.dumps({k: v for k, v in e.items() if k != "source"}))
                for key, e in entries.items()
            ),
        )

    def confirmed(self, name: str) -> Optional[Tuple[int, int, int, int]]:
        """(size, mtime_ns, entries size, entries mtime_ns) when the checksums last held."""
        row = self.db.execute(
            "SELECT size, mtime_ns, entries_size, entries_mtime_ns FROM shards WHERE name = ?",
            (name,),
        ).fetchone()
        return tuple(row) if row and row[0] is not None else None

    def confirm(self, name: str, stats: Tuple[int, int, int, int]) -> None:
        with self.db:
            self.db.execute(
                "UPDATE shards SET size = ?, mtime_ns = ?, entries_size = ?, entries_mtime_ns = ? "
                "WHERE name = ?",
                (*stats, name),
            )

    # -------------------------------------------------------------- images
    def find(self, key: str) -> Optional[Tuple[str, dict]]:
        """(shard name, entry) of a key (hex), or None."""
        try:
            blob = bytes.fromhex(key)
        except ValueError:
            return None
        row = self.db.execute("SELECT shard, entry FROM images WHERE key = ?", (blob,)).fetchone()
        if row is None:
            return None
        return self.shard_names()[row[0]], json.loads(row[1])

    def __len__(self) -> int:
        return self.db.execute("SELECT count(*) FROM images").fetchone()[0]

    def keys(self) -> Iterator[str]:
        for (blob,) in self.db.execute("SELECT key FROM images"):
            yield blob.hex()

    # -------------------------------------------------------------- paths
    def put_paths(self, rows: Iterable[Tuple[str, int, int, str]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?)",
                ((p, size, mtime, bytes.fromhex(key)) for p, size, mtime, key in rows),
            )

    def path_entry(self, path: str) -> Optional[Tuple[int, int, str]]:
        row = self.db.execute(
            "SELECT size, mtime_ns, key FROM paths WHERE path = ?", (path,)
        ).fetchone()
        return (row[0], row[1], row[2].hex()) if row else None

    def path_entries(self, paths: List[str]) -> dict:
        """path -> (size, mtime_ns, key) for those of ``paths`` in the table."""
        out = {}
        for start in range(0, len(paths), 500):
            chunk = paths[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for p, size, mtime, key in self.db.execute(
                f"SELECT path, size, mtime_ns, key FROM paths WHERE path IN ({marks})", chunk
            ):
                out[p] = (size, mtime, key.hex())
        return out


def file_stat(path) -> Optional[Tuple[int, int]]:
    """(size, mtime_ns), or None when the file cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, TypeError):  # TypeError: not a path (an image inside a dataset)
        return None
    return st.st_size, st.st_mtime_ns
