"""KV caches of recent conversations, kept between requests so a follow-up turn prefills
only its new tokens.

Each entry is a ``generation.prompt_cache.PromptCache`` (mlx-lm KV caches plus the key
of every cached position: token ids, image tiles by their hash). ``take`` hands out
the entry sharing the longest prefix with a new prompt: the entry itself when the
whole entry is that prefix (the next turn of its conversation; nothing else would
use it again), a trimmed copy otherwise (another question after the same system
prompt or image), so the entry stays for its own conversation. The store is an LRU
bounded by the bytes of the cached keys and values.
"""

from __future__ import annotations

import threading
from typing import Hashable, List, Sequence

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..generation.prompt_cache import PromptCache, common_prefix

DEFAULT_MAX_BYTES = 2 * 2**30


def cache_nbytes(cache: PromptCache) -> int:
    return sum(layer.nbytes for layer in cache.layers if layer.keys is not None)


class PrefixCache:
    """Least-recently-used ``PromptCache`` entries, at most ``max_bytes`` in all."""

    def __init__(self, model, max_bytes: int = DEFAULT_MAX_BYTES):
        self.model = model
        self.max_bytes = max_bytes
        self._entries: List[PromptCache] = []  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(cache_nbytes(c) for c in self._entries)

    def take(self, keys: Sequence[Hashable]) -> PromptCache:
        """A ``PromptCache`` to prefill ``keys`` into (call its ``reuse(keys)`` next)."""
        with self._lock:
            best, best_len = None, 0
            for entry in self._entries:
                n = common_prefix(entry.keys, keys)
                if n > best_len:
                    best, best_len = entry, n
            if best is None:
                return PromptCache(self.model)
            if best_len >= len(best.keys):
                self._entries.remove(best)
                return best
            return _prefix_copy(self.model, best, best_len)

    def put(self, cache: PromptCache) -> None:
        """Keep ``cache`` (its keys must name every cached position); evict the oldest."""
        if not cache.keys or cache.offset != len(cache.keys):
            return
        with self._lock:
            self._entries = [e for e in self._entries if e.keys != cache.keys]
            self._entries.append(cache)
            total = sum(cache_nbytes(c) for c in self._entries)
            while self._entries and total > self.max_bytes:
                total -= cache_nbytes(self._entries.pop(0))

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def from_layers(model, layers, keys: Sequence[Hashable]) -> PromptCache:
    """A ``PromptCache`` around KV caches filled elsewhere (the batch generator's)."""
    cache = PromptCache(model)
    cache.layers = list(layers)
    cache.record(keys)
    return cache


def _prefix_copy(model, entry: PromptCache, n: int) -> PromptCache:
    layers = []
    for layer in entry.layers:
        copy = KVCache()
        copy.keys = mx.contiguous(layer.keys[..., :n, :])
        copy.values = mx.contiguous(layer.values[..., :n, :])
        copy.offset = n
        layers.append(copy)
    mx.eval([(c.keys, c.values) for c in layers])
    return from_layers(model, layers, entry.keys[:n])
