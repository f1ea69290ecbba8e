"""Splitting an embedding run over ranks with ``mx.distributed`` (``mlx.launch``).

Started by ``mlx.launch`` (ring backend over TCP, or any MLX backend), every rank
lists the same images. Rank r hashes images r, r + n, r + 2n, ...; the digests are
exchanged with ``all_gather`` so every rank knows every image's key. Each distinct
key is then owned by the rank that hashed its first occurrence, so no image is
encoded twice and the work splits evenly. Ranks write their own shards and
journals into the shared output folder; after a barrier rank 0 merges the journals
into ``index.json``. Without a launcher this is a group of one and costs nothing.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import mlx.core as mx
import numpy as np

DIGEST = 32


class Group:
    """The ranks of this run (``mx.distributed`` group, or just this process)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1

    @classmethod
    def init(cls) -> "Group":
        if not mx.distributed.is_available():
            return cls()
        group = mx.distributed.init()
        return cls(group if group.size() > 1 else None)

    def _cpu(self, fn, x: mx.array) -> np.ndarray:
        with mx.stream(mx.cpu):
            out = fn(x, group=self.group)
            mx.eval(out)
        return np.array(out)

    def all_sum(self, values: Sequence[int]) -> List[int]:
        if self.size == 1:
            return list(values)
        out = self._cpu(mx.distributed.all_sum, mx.array(np.asarray(values, dtype=np.int32)))
        return [int(v) for v in out]

    def barrier(self) -> None:
        self.all_sum([0])

    def agree(self, ok: bool) -> bool:
        """True when every rank is ok (a barrier too)."""
        return self.all_sum([0 if ok else 1])[0] == 0

    def all_gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every rank, rank 0's first; every rank must pass the same shape."""
        if self.size == 1:
            return rows
        return self._cpu(mx.distributed.all_gather, mx.array(rows))


def share(count: int, rank: int, size: int) -> range:
    """The item indices rank ``rank`` handles: rank, rank + size, ..."""
    return range(rank, count, size)


def exchange_digests(
    group: Group, count: int, mine: Sequence[Optional[bytes]]
) -> List[Optional[bytes]]:
    """Every item's digest (None where its rank could not read it), on every rank.

    ``mine`` holds the digests of ``share(count, group.rank, group.size)``.
    """
    if count == 0:
        return []
    per_rank = -(-count // group.size)
    rows = np.zeros((per_rank, DIGEST + 1), dtype=np.uint8)
    for j, digest in enumerate(mine):
        if digest is not None:
            rows[j, :DIGEST] = np.frombuffer(digest, dtype=np.uint8)
            rows[j, DIGEST] = 1
    everything = group.all_gather(rows).reshape(group.size, per_rank, DIGEST + 1)
    out: List[Optional[bytes]] = [None] * count
    for r in range(group.size):
        for j, i in enumerate(share(count, r, group.size)):
            row = everything[r, j]
            out[i] = bytes(row[:DIGEST]) if row[DIGEST] else None
    return out


def owners(keys: Sequence[Optional[str]], size: int) -> dict:
    """key -> (index of its first occurrence, owning rank)."""
    first = {}
    for i, key in enumerate(keys):
        if key is not None and key not in first:
            first[key] = (i, i % size)
    return first
