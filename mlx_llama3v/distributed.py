"""The ranks of a run under ``mlx.launch`` (``mx.distributed``), in one small wrapper.

``Ranks()`` is this process's place (a group of one without a launcher, costing
nothing); the collectives run on the CPU stream with numpy in and out. ``embed``
splits images over ranks with it; ``train`` (``train.distributed.World``) adds its
record ownership and gradient averaging.
"""

from __future__ import annotations

from typing import List, Sequence

import mlx.core as mx
import numpy as np
from mlx.nn.utils import average_gradients


class Ranks:
    """This process's rank and the group's size, with the collectives both commands use."""

    def __init__(self):
        group = mx.distributed.init() if mx.distributed.is_available() else None
        self.group = group if group is not None and group.size() > 1 else None
        self.rank = self.group.rank() if self.group is not None else 0
        self.size = self.group.size() if self.group is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self, fn, x: np.ndarray) -> np.ndarray:
        with mx.stream(mx.cpu):
            out = fn(mx.array(x), group=self.group)
            mx.eval(out)
        return np.array(out)

    def all_sum(self, values: Sequence[int]) -> List[int]:
        """Element-wise sums of whole numbers over ranks (int32 on the wire)."""
        x = np.asarray(values, dtype=np.int32)
        if self.size > 1:
            x = self._collective(mx.distributed.all_sum, x)
        return [int(v) for v in x]

    def sum(self, values: Sequence[float]) -> np.ndarray:
        """Element-wise sums over ranks (float64 results; float32 on the wire)."""
        x = np.asarray(values, dtype=np.float32)
        if self.size > 1:
            x = self._collective(mx.distributed.all_sum, x)
        return x.astype(np.float64)

    def barrier(self) -> None:
        self.all_sum([0])

    def agree(self, ok: bool) -> bool:
        """True when every rank is ok (a barrier too)."""
        return self.all_sum([0 if ok else 1])[0] == 0

    def all_gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows of every rank, rank 0's first; every rank must pass the same shape."""
        if self.size == 1:
            return rows
        return self._collective(mx.distributed.all_gather, rows)

    def average(self, grads):
        """Gradients averaged over ranks (mlx's ``average_gradients``; identity for one)."""
        if self.size == 1:
            return grads
        return average_gradients(grads, group=self.group)
