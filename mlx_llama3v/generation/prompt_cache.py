"""The language model's KV cache, and the tokens it holds, across generations.

mlx-lm's ``generate_step`` fills a ``prompt_cache`` in place. ``PromptCache`` keeps it
together with a key per cached position: the token id, or for an image placeholder
the hash of the tile whose features filled it (placeholder ids alone cannot tell two
images apart). A later prompt that starts with the same keys (the next turn of a
conversation: the earlier turns, the answer, then the new question) reuses the cache
for that prefix and prefills only the rest, as mlx-lm's server does.
"""

from __future__ import annotations

from typing import Hashable, List, Optional, Sequence

import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache


class PromptCache:
    """mlx-lm KV caches for ``model.language_model`` plus the keys of the cached tokens.

    ``max_kv_size`` makes rotating caches of that many tokens (mlx-lm's); once one has
    wrapped around it cannot be trimmed, and a new prompt is prefilled from scratch.
    """

    def __init__(self, model, max_kv_size: Optional[int] = None):
        self.language_model = model.language_model
        self.max_kv_size = max_kv_size
        self.reset()

    def reset(self) -> None:
        self.layers = make_prompt_cache(self.language_model, self.max_kv_size)
        self.keys: List[Hashable] = []

    @property
    def offset(self) -> int:
        """Tokens the KV cache holds."""
        return self.layers[0].offset if self.layers else 0

    def reuse(self, keys: Sequence[Hashable]) -> int:
        """Keep the longest cached prefix of ``keys`` (trim the rest); its length.

        At least the last key is left to prefill: its logits give the first token.
        """
        keep = max(0, min(common_prefix(self.keys, keys), len(keys) - 1))
        if self.offset != len(self.keys) or (
            self.offset > keep and not can_trim_prompt_cache(self.layers)
        ):
            self.reset()
            return 0
        trim_prompt_cache(self.layers, self.offset - keep)
        self.keys = self.keys[:keep]
        return keep

    def record(self, keys: Sequence[Hashable]) -> None:
        """After generating: ``keys`` are the prompt's and the generated tokens'."""
        n = self.offset
        if n > len(keys):  # the cache holds tokens we cannot name: start over next time
            self.reset()
            return
        self.keys = list(keys[:n])


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_keys(
    input_ids: np.ndarray, image_token_id: int, tile_keys: Sequence[str], tokens_per_tile: int
) -> List[Hashable]:
    """Token ids, with each image placeholder replaced by the key of its tile."""
    keys: List[Hashable] = np.asarray(input_ids).tolist()
    for i, pos in enumerate(np.flatnonzero(np.asarray(input_ids) == image_token_id)):
        keys[pos] = tile_keys[i // tokens_per_tile]
    return keys
