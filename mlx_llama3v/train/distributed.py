"""Data-parallel training with ``mx.distributed`` (started by ``mlx.launch``).

Every rank holds the whole model and reads only its share of the records (record i
belongs to rank i mod world size): it decodes and tokenizes only those. The record
lengths are then summed across ranks so that every rank computes the same batch
plan; within each global batch a rank runs the samples it owns. Gradients are
averaged with mlx's ``average_gradients`` (the helper mlx-lm's trainer uses).

For the result to equal one rank with the same global batch, each rank scales its
summed token losses by ``world / global target tokens`` before averaging, so the
update is the token mean over the global batch however the tokens are spread. A
rank with no samples in a batch contributes zero gradients.

``python -m mlx_llama3v.train`` under ``mlx.launch --backend ring -n 2 ...`` (or
``--hostfile``) runs this; without a launcher the group has one rank.
"""

from __future__ import annotations

from typing import Dict, Sequence

import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map


class World:
    """This process's place among the ranks."""

    def __init__(self):
        self.group = mx.distributed.init() if mx.distributed.is_available() else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.size = self.group.size() if self.group is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, record: int) -> bool:
        return record % self.size == self.rank

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sum over ranks (float64 results; float32 on the wire)."""
        x = np.asarray(values, dtype=np.float32)
        if self.size == 1:
            return x.astype(np.float64)
        with mx.stream(mx.cpu):
            out = mx.distributed.all_sum(mx.array(x), group=self.group)
            mx.eval(out)
        return np.array(out).astype(np.float64)

    def sum_ints(self, values: Sequence[int]) -> np.ndarray:
        x = np.asarray(values, dtype=np.int32)
        if self.size == 1:
            return x
        with mx.stream(mx.cpu):
            out = mx.distributed.all_sum(mx.array(x), group=self.group)
            mx.eval(out)
        return np.array(out)

    def agree(self, ok: bool) -> bool:
        """True when every rank is ok."""
        return int(self.sum_ints([0 if ok else 1])[0]) == 0

    def average(self, grads):
        """Gradients averaged over ranks (identity for one rank)."""
        if self.size == 1:
            return grads
        return average_gradients(grads, group=self.group)

    def gather_lengths(self, mine: Dict[int, int], count: int) -> Dict[int, int]:
        """record -> length for every usable record of every rank (0 = unusable)."""
        lengths = np.zeros(count, dtype=np.int32)
        for i, n in mine.items():
            lengths[i] = n
        lengths = self.sum_ints(lengths)
        return {i: int(n) for i, n in enumerate(lengths) if n > 0}


def zeros_like(tree):
    return tree_map(lambda x: mx.zeros_like(x), tree)

