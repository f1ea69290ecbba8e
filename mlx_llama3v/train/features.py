"""Frozen vision features for a batch, and the projection that may be trained.

The vision tower is frozen in both stages, so its features are computed outside
the gradient: encoded on the fly from the images' tiles (``vision_tower.encode``),
or read from a feature cache made by ``mlx_llama3v.embed`` (``--features``; its
``FeatureCache`` and ``stack_features``), which skips the tower entirely. From a
cache no image file is opened at all: ``cache_layout`` gives the data reader each
image's key (from the path map embed wrote) and tile layout (from the cache's
entries), and the features are read by key; damage found by the cache's checksums
stops the run with a ``DataError`` naming the shard, before the step uses it. Either way
the result is a list of tile groups ``(tile indices, TileBatch, features)``, the
shape ``Model.project`` takes; the projection runs inside the loss when the
projector trains.
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..embed import CacheError, stack_features
from ..models.vision import TileBatch
from ..processing import preprocess_image
from ..processing import ProcessedImage, resolve_processor_config
from .data import BadSample, DataError
from .readers import ImageBytes

Groups = List[Tuple[List[int], TileBatch, mx.array]]


class VisionFeatures:
    """``features(images) -> (groups, n_tiles)`` for the image paths of a batch."""

    def __init__(self, model, processor_config: Mapping[str, Any], cache=None):
        self.model = model
        self.processor_config = processor_config
        self.cache = cache

    def __call__(self, images: Sequence[str]) -> Tuple[Groups, int]:
        if not images:
            return [], 0
        if self.cache is not None:
            try:
                items = [self.cache[src] for src in images]
            except CacheError as e:
                raise DataError(str(e)) from None
            feats, batch = stack_features(items)
            n = feats.shape[0]
            return [(list(range(n)), batch, feats.astype(mx.float32))], n
        tiles = [t for src in images for t in preprocess_image(src, self.processor_config).tiles]
        return self.model.vision_tower.encode(tiles), len(tiles)


def project(model, groups: Groups, n_tiles: int) -> Optional[List[mx.array]]:
    """Projected rows of every tile, in tile order (differentiable w.r.t. the projector)."""
    return model.project_groups(groups, n_tiles) if groups else None


def cache_layout(cache, processor_config: Mapping[str, Any]):
    """``src -> (key, ProcessedImage)`` for ``Encoder(layout=...)``: the key of an image
    path (path map) or of image bytes, and its tiles as placeholders of the cached patch
    grids (zero-stride arrays: the prompt needs their shapes only). No image is opened."""
    p = resolve_processor_config(processor_config)["patch_size"]
    blank = np.zeros((1, 1, 3), np.float32)

    def layout(src) -> Tuple[str, ProcessedImage]:
        if isinstance(src, (bytes, bytearray)):
            key = hashlib.sha256(src).hexdigest()
            found = cache.lookup.find(key)
            name = getattr(src, "name", "image bytes") if isinstance(src, ImageBytes) else "image bytes"
        elif isinstance(src, str):
            try:
                hit = cache.find(src)
            except CacheError as e:
                raise BadSample(str(e)) from None
            key, found, name = (hit[0], (None, hit[1]), src) if hit else (None, None, src)
        else:
            raise BadSample(f"{type(src).__name__} images cannot be looked up in a feature cache")
        if found is None:
            raise BadSample(f"{name}: not in the feature cache (run mlx_llama3v.embed on it)")
        entry = found[1]
        tiles = [np.broadcast_to(blank, (r * p, c * p, 3)) for r, c in entry["tiles"]]
        grid = tuple(entry["grid"]) if entry["grid"] else None
        return key, ProcessedImage(tiles, grid)

    return layout
