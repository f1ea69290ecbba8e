"""The whole Llama 3-V model: vision tower -> projector -> mlx-lm's Llama.

Images become tiles, tiles become projected feature rows, and those rows replace,
in order, the embeddings of the image-placeholder tokens in the prompt (ids and
embeddings stay one to one). The language model is ``mlx_lm.models.llama``
unchanged, so its KV caches, samplers and ``generate_step(input_embeddings=...)``
apply as they are. One code path serves every family; their differences live in
``ModelConfig``.

Weight names: ``vision_tower.*`` (SigLIP names), ``projector.*`` (the kind's
names) and ``language_model.*`` (mlx-lm's Llama names). ``mlx_llama3v.convert``
maps each source family's names onto these.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from ..config import ModelConfig
from .projector import build_projector
from .vision import TileBatch, VisionTower

PARTS = ("vision_tower", "projector", "language_model")


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.projector = build_projector(config.projector_config)
        self.language_model = llama.Model(config.text_config)

    def encode_tiles(self, tiles: Sequence) -> List[Tuple[List[int], TileBatch, mx.array]]:
        """Evaluated vision features, grouped; see ``VisionTower.encode``."""
        return self.vision_tower.encode(tiles)

    def project(self, features: mx.array, batch: TileBatch) -> List[mx.array]:
        """Projected LM-width rows for each tile, padding removed."""
        out = self.projector(features, batch)
        if self.config.projector_config.kind == "resampler":
            return [out[i] for i in range(out.shape[0])]
        return [out[i, :n] for i, n in enumerate(batch.lengths)]

    def project_groups(self, groups, n_tiles: int) -> List[mx.array]:
        """Projected rows of every tile, in tile order, from ``(tile indices, TileBatch,
        features)`` groups (``encode_tiles``, or a feature cache)."""
        out: List[Optional[mx.array]] = [None] * n_tiles
        for group, batch, feats in groups:
            for i, rows in zip(group, self.project(feats, batch)):
                out[i] = rows
        return out

    def encode_images(self, tiles: Sequence) -> List[mx.array]:
        """Channels-last, normalised tiles -> one (tokens, LM width) array per tile."""
        return self.project_groups(self.encode_tiles(tiles), len(tiles))

    def get_input_embeddings(
        self,
        input_ids,
        tiles: Optional[Sequence] = None,
        image_features: Optional[Sequence[mx.array]] = None,
    ) -> mx.array:
        """Token embeddings with the image placeholders replaced by image features.

        ``input_ids`` is (B, T) or (T,); features (given, or encoded from ``tiles``)
        fill the placeholder positions in reading order.
        """
        ids = np.asarray(input_ids)
        squeeze = ids.ndim == 1
        ids = ids.reshape(1, -1) if squeeze else ids
        embeds = self.language_model.model.embed_tokens(mx.array(ids))
        if image_features is None and tiles:
            image_features = self.encode_images(tiles)
        slots = ids == self.config.image_token_id
        n_slots = int(slots.sum())
        feats = (
            mx.concatenate(list(image_features), axis=0)
            if image_features is not None and len(image_features)
            else None
        )
        n_feats = 0 if feats is None else feats.shape[0]
        if n_slots != n_feats:
            raise ValueError(
                f"the prompt has {n_slots} image placeholder tokens but the images "
                f"give {n_feats} feature rows"
            )
        if n_slots:
            # position -> feature row, then a select: differentiable, no scatter
            rows = np.cumsum(slots.reshape(-1)) - 1
            gathered = feats[mx.array(np.maximum(rows, 0).reshape(ids.shape))]
            embeds = mx.where(mx.array(slots)[..., None], gathered.astype(embeds.dtype), embeds)
        return embeds[0] if squeeze else embeds

    def __call__(
        self,
        input_ids,
        tiles: Optional[Sequence] = None,
        cache=None,
        image_features: Optional[Sequence[mx.array]] = None,
    ) -> mx.array:
        """Logits for (B, T) ids with the given images' tiles (or features)."""
        ids = np.asarray(input_ids)
        embeds = self.get_input_embeddings(ids, tiles, image_features)
        return self.language_model(mx.array(ids), cache=cache, input_embeddings=embeds)

    def sanitize(self, weights: dict) -> dict:
        """Normalise each part's weights; keys must already carry a part prefix."""
        parts = {p: {} for p in PARTS}
        for k, v in weights.items():
            part, _, rest = k.partition(".")
            if part not in parts:
                raise ValueError(f"weight {k!r} belongs to no model part ({', '.join(PARTS)})")
            parts[part][rest] = v
        out = {}
        for part, sub in parts.items():
            for k, v in getattr(self, part).sanitize(sub).items():
                out[f"{part}.{k}"] = v
        return out
