"""Spread independent work over the CPU cores when MLX runs on the CPU.

MLX's CPU element-wise kernels (exp in softmax, tanh in GELU) run on one thread,
and on a SigLIP tower they take more time than the matrix products. Splitting a
batch of tiles over one CPU stream per core, with OpenBLAS held to one thread,
keeps every core busy (about 1.5x on 2 cores). On a GPU this is a no-op. On x86
CPUs the tower's softmax and GELU run in numpy instead (``cpu_kernels``), which
is faster still; this is the path when that is turned off.
"""

from __future__ import annotations

import os
from typing import Callable, List, Sequence, TypeVar

import mlx.core as mx

from .._blas import single_threaded

T = TypeVar("T")

_streams: List[mx.Stream] = []


def cpu_workers() -> int:
    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def _cpu_streams(n: int) -> List[mx.Stream]:
    while len(_streams) < n:
        _streams.append(mx.new_stream(mx.cpu))
    return _streams[:n]


def balanced_groups(sizes: Sequence[int], n: int) -> List[List[int]]:
    """Indices split into at most n groups of similar total size.

    Indices are sorted by size and cut into contiguous runs, so tiles of equal size
    share a group (less padding in each group's batch).
    """
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    target = sum(sizes) / max(1, min(n, len(sizes)))
    groups: List[List[int]] = [[]]
    load = 0
    for i in order:
        if groups[-1] and load + sizes[i] / 2 > target and len(groups) < n:
            groups.append([])
            load = 0
        groups[-1].append(i)
        load += sizes[i]
    return [sorted(g) for g in groups if g]


def map_evaluated(fn: Callable[[int], T], keys: Sequence[int]) -> List[T]:
    """[fn(k) for k in keys], evaluated; one CPU stream per key when on the CPU."""
    keys = list(keys)
    if len(keys) == 1 or cpu_workers() == 1:
        outs = [fn(k) for k in keys]
        mx.eval(outs)
        return outs
    outs = []
    with single_threaded():
        for k, stream in zip(keys, _cpu_streams(len(keys))):
            with mx.stream(stream):
                outs.append(fn(k))
        mx.eval(outs)
    return outs
