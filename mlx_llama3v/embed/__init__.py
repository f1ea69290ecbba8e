"""Precompute vision-tower features for large image collections: ``mlx_llama3v.embed``.

The vision tower is frozen during training, so its features (the tower's output,
before the projector) are computed once and read back instead of re-running SigLIP.
``embed()`` (and the ``mlx_llama3v.embed`` command) builds a resumable, sharded
safetensors cache keyed by the sha256 of each image's bytes; ``FeatureCache`` reads
it back::

    from mlx_llama3v.embed import FeatureCache, stack_features

    cache = FeatureCache("features/")
    item = cache["photo.jpg"]          # or the image's bytes, or its sha256
    item.tiles, item.grid              # per-tile (tokens, width) features; slice grid
    feats, batch = stack_features([item])
    rows = model.project(feats, batch)  # projector input, as from the tower

Modules: ``cache`` (format, writer, reader, healing, verify), ``lookup`` (the SQLite
key and path table), ``codec`` (stored dtypes, int8), ``sources`` (folders, path
lists, LLaVA / MiniCPM-V JSON, datasets), ``pipeline`` (decode threads, batching,
background writing), ``distributed`` (splitting over ``mlx.launch`` ranks),
``runner`` (one run), ``cli``.
"""

from .cache import CacheError, CachedImage, FeatureCache, image_key, stack_features, verify
from .runner import EmbedError, Summary, embed

__all__ = [
    "CacheError",
    "CachedImage",
    "EmbedError",
    "FeatureCache",
    "Summary",
    "embed",
    "image_key",
    "stack_features",
    "verify",
]
