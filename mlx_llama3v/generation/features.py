"""Image features cached by tile content, per model, for the length of a session.

A tile is hashed (sha256 of its shape, dtype and normalised pixels); the hash covers
the image and every preprocessing setting, since those decide the pixels. The
projected features of recently seen tiles are kept in a small LRU on the model, so
asking about the same image again (the next turn of a chat, another question) skips
the vision tower and the projector. The cache assumes frozen vision weights: call
``feature_cache(model).clear()`` after changing them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

DEFAULT_MAX_BYTES = 512 * 2**20
_ATTRIBUTE = "_image_feature_cache"


class ImageFeatureCache:
    """Least-recently-used tile features, bounded by their total size in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: "OrderedDict[str, mx.array]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Optional[mx.array]:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: mx.array) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        if value.nbytes > self.max_bytes:
            return
        self._entries[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


def tile_key(tile: np.ndarray) -> str:
    tile = np.ascontiguousarray(tile)
    digest = hashlib.sha256(f"{tile.shape}{tile.dtype.str}".encode())
    digest.update(tile.data)
    return digest.hexdigest()


def feature_cache(model) -> ImageFeatureCache:
    """The model's feature cache, made on first use.

    Kept as a plain attribute (not an ``nn.Module`` child), so it is no parameter.
    """
    cache = getattr(model, _ATTRIBUTE, None)
    if cache is None:
        cache = ImageFeatureCache()
        setattr(model, _ATTRIBUTE, cache)
    return cache


def image_features(
    model, tiles: Sequence[np.ndarray], keys: Sequence[str]
) -> Tuple[List[mx.array], int]:
    """Evaluated features of each tile, and how many tiles had to be encoded.

    Tiles missing from the cache are encoded together in one ``encode_images`` call.
    """
    cache = feature_cache(model)
    found = {k: cache.get(k) for k in dict.fromkeys(keys)}
    missing = [k for k, v in found.items() if v is None]
    if missing:
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        encoded = model.encode_images([tiles[first[k]] for k in missing])
        mx.eval(encoded)
        for k, v in zip(missing, encoded):
            found[k] = v
            cache.put(k, v)
    return [found[k] for k in keys], len(missing)
