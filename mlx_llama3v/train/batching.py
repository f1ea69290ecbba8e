"""Length-bucketed batches with padding masks, in an order fixed by (seed, epoch).

``BatchPlan`` decides which samples (by record number) form each global batch: every
epoch the samples are shuffled, stably sorted by length so that a batch holds samples
of similar length (little padding), cut into batches, and the batches shuffled. The
plan depends only on the seed, the epoch and the lengths of all samples, so every
data-parallel rank computes the same plan, a run can be resumed from a micro-batch
count alone, and a batch's samples are the same whatever the number of ranks.

``collate`` pads token ids on the right (causal attention never looks right, so no
attention mask is needed) and carries the loss mask with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

from .data import Sample


class BatchPlan:
    """The global batches of every epoch; micro-batch m is batch m % n of epoch m // n."""

    def __init__(self, lengths: Dict[int, int], batch_size: int, seed: int):
        if batch_size < 1:
            raise ValueError("batch size must be at least 1")
        if not lengths:
            raise ValueError("no training samples")
        self.indices = np.array(sorted(lengths), dtype=np.int64)
        self.lengths = np.array([lengths[i] for i in self.indices], dtype=np.int64)
        self.batch_size = min(batch_size, len(self.indices))
        self.seed = seed
        self._epoch = None
        self._batches: List[np.ndarray] = []

    def __len__(self) -> int:
        """Batches per epoch (the last one may be smaller)."""
        return -(-len(self.indices) // self.batch_size)

    def epoch(self, epoch: int) -> List[np.ndarray]:
        if self._epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.indices))
            order = order[np.argsort(self.lengths[order], kind="stable")]
            chunks = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            self._batches = [self.indices[chunks[k]] for k in rng.permutation(len(chunks))]
            self._epoch = epoch
        return self._batches

    def batch(self, micro: int) -> List[int]:
        """Record numbers of micro-batch ``micro`` (counted from the start of training)."""
        return self.epoch(micro // len(self))[micro % len(self)].tolist()


@dataclass
class Batch:
    """Padded token ids (B, T), the loss mask and the samples they came from.

    ``targets[b, t]`` is True where token t is learnt (from position t - 1).
    """

    ids: np.ndarray
    targets: np.ndarray
    samples: List[Sample]

    @property
    def num_targets(self) -> int:
        return int(self.targets[:, 1:].sum())

    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.samples)

    @property
    def images(self) -> List[str]:
        return [src for s in self.samples for src in s.images]


def collate(samples: Sequence[Sample], pad_id: int, pad_to: int = 8) -> Batch:
    """Right-padded ids (to a multiple of ``pad_to``) and the loss mask (False on padding)."""
    T = max(s.length for s in samples)
    T = -(-T // pad_to) * pad_to
    ids = np.full((len(samples), T), pad_id, dtype=np.int32)
    targets = np.zeros((len(samples), T), dtype=bool)
    for b, s in enumerate(samples):
        ids[b, : s.length] = s.ids
        targets[b, : s.length] = s.targets
    return Batch(ids, targets, list(samples))
