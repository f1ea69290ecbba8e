"""A feature cache of many synthetic images, written the way ``embed`` writes one.

Each image has one tile of ``tokens`` x ``width`` float16 values derived from its
number, so a reader can check what it got back. Used by the cache tests (100K
entries) and ``benchmarks/scale.py`` (1M).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mlx_llama3v.embed.cache import INDEX, EncodedImage, ShardWriter, new_index, write_json
from mlx_llama3v.embed.lookup import Lookup

SETTINGS = {"feature": "synthetic", "dtype": "float16", "preprocessing": {}}


def synthetic_key(i: int) -> str:
    return hashlib.sha256(f"image {i}".encode()).hexdigest()


def synthetic_tile(i: int, tokens: int = 2, width: int = 4) -> np.ndarray:
    return (np.arange(tokens * width, dtype=np.float32).reshape(tokens, width) + i % 1000).astype(
        np.float16
    )


def write_synthetic_cache(root: Path, n: int, per_shard: int = 50_000, tokens=2, width=4) -> Path:
    root = Path(root)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    doc = new_index(SETTINGS, "synthetic")
    write_json(root / INDEX, doc)
    lookup = Lookup(root)
    writer = ShardWriter(root, doc, root / INDEX, "float16", lookup=lookup)
    for i in range(n):
        image = EncodedImage(
            synthetic_key(i), [(synthetic_tile(i, tokens, width), None)], [(1, tokens)], None, f"{i}.png"
        )
        writer.add(image)
        if (i + 1) % per_shard == 0:
            writer.flush()
    writer.flush()
    lookup.close()
    return root
