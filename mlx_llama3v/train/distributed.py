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

from typing import Dict

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

from ..distributed import Ranks


class World(Ranks):
    """This process's place among the ranks, and which records it reads."""

    def owns(self, record: int) -> bool:
        return record % self.size == self.rank

    def gather_lengths(self, mine: Dict[int, int], count: int) -> Dict[int, int]:
        """record -> length for every usable record of every rank (0 = unusable)."""
        lengths = np.zeros(count, dtype=np.int32)
        for i, n in mine.items():
            lengths[i] = n
        lengths = self.all_sum(lengths)
        return {i: int(n) for i, n in enumerate(lengths) if n > 0}


def zeros_like(tree):
    return tree_map(lambda x: mx.zeros_like(x), tree)

