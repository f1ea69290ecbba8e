"""Frozen vision features for a batch, and the projection that may be trained.

The vision tower is frozen in both stages, so its features are computed outside
the gradient: encoded on the fly from the images' tiles (``vision_tower.encode``),
or read from a feature cache made by ``mlx_llama3v.embed`` (``--features``; its
``FeatureCache`` and ``stack_features``), which skips the tower entirely. Either way
the result is a list of tile groups ``(tile indices, TileBatch, features)``, the
shape ``Model.project`` takes; the projection runs inside the loss when the
projector trains.
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple

import mlx.core as mx

from ..embed import stack_features
from ..models.vision import TileBatch
from ..processing import preprocess_image
from .data import BadSample

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
            feats, batch = stack_features([self.cache[src] for src in images])
            n = feats.shape[0]
            return [(list(range(n)), batch, feats.astype(mx.float32))], n
        tiles = [t for src in images for t in preprocess_image(src, self.processor_config).tiles]
        return self.model.vision_tower.encode(tiles), len(tiles)


def project(model, groups: Groups, n_tiles: int) -> Optional[List[mx.array]]:
    """Projected rows of every tile, in tile order (differentiable w.r.t. the projector)."""
    return model.project_groups(groups, n_tiles) if groups else None


def tile_patch_counts(cache) -> Callable[[str], List[int]]:
    """``src -> [patches per tile]`` from a feature cache, for the data checks."""

    def counts(src: str) -> List[int]:
        try:
            item = cache[src]
        except KeyError as e:
            raise BadSample(f"{src}: not in the feature cache ({e.args[0] if e.args else e})") from None
        return [int(t.shape[0]) for t in item.tiles]

    return counts
