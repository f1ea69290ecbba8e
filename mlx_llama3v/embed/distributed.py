"""Splitting an embedding run over ranks with ``mx.distributed`` (``mlx.launch``).

Started by ``mlx.launch`` (ring backend over TCP, or any MLX backend), every rank
lists the same images. Rank r hashes images r, r + n, r + 2n, ...; the digests are
exchanged with ``all_gather`` so every rank knows every image's key. Each distinct
key is then owned by the rank that hashed its first occurrence, so no image is
encoded twice and the work splits evenly. Ranks write their own shards and
journals into the shared output folder; after a barrier rank 0 merges the journals
into ``index.json``. Without a launcher this is a group of one and costs nothing
(``mlx_llama3v.distributed.Ranks``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..distributed import Ranks

DIGEST = 32


def share(count: int, rank: int, size: int) -> range:
    """The item indices rank ``rank`` handles: rank, rank + size, ..."""
    return range(rank, count, size)


def exchange_digests(
    group: Ranks, count: int, mine: Sequence[Optional[bytes]]
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
