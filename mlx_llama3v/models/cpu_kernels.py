"""Softmax and GELU for the frozen vision tower on CPUs where MLX runs them one lane wide.

MLX's CPU backend vectorises ``exp`` and ``tanh`` only where it has a SIMD layer for
them (Apple silicon, through Accelerate); its x86-64 build evaluates them one element at
a time, single-threaded. On a SigLIP-so400m tower that made the softmax and the GELU
take longer than every matrix product together (MLX ``exp``: 17 ns per element, numpy's
AVX2/AVX-512 ``exp``: under 1 ns, on this project's 2-core Linux machine).

So while ``use()`` is active (``VisionTower.encode`` turns it on: the tower is frozen,
its features carry no gradient), the attention softmax and the tanh-GELU of float32
activations run in numpy, in place on the evaluated MLX array's own memory (MLX exposes
it writable through the buffer protocol: no copies), split over the cores with a thread
pool (numpy's ufuncs release the GIL). The matrix products stay in MLX. Nowhere else,
and on a GPU or a Mac never: ``available()`` says whether this applies;
``MLX_LLAMA3V_CPU_KERNELS=0`` turns it off (the benchmarks compare both).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import mlx.core as mx
import numpy as np

from .parallel import cpu_workers

_active = contextvars.ContextVar("mlx_llama3v_cpu_kernels", default=False)
_pool: Optional[ThreadPoolExecutor] = None
_SQRT_2_OVER_PI = 0.7978845608028654


def available() -> bool:
    """True on a non-Apple CPU device, unless ``MLX_LLAMA3V_CPU_KERNELS=0``."""
    if os.environ.get("MLX_LLAMA3V_CPU_KERNELS", "1") == "0" or sys.platform == "darwin":
        return False
    return mx.default_device() == mx.cpu


@contextlib.contextmanager
def use(enabled: bool = True) -> Iterator[None]:
    """Route the vision tower's softmax and GELU through numpy inside this block."""
    token = _active.set(enabled and available())
    try:
        yield
    finally:
        _active.reset(token)


def active(x: mx.array) -> bool:
    """Whether ``x`` (an activation about to be softmaxed or GELU'd) takes the numpy path."""
    return _active.get() and x.dtype == mx.float32


def softmax_(scores: mx.array) -> mx.array:
    """Softmax over the last axis, computed in place; returns ``scores``.

    Masked entries are ``-inf`` (every row needs one finite entry)."""
    return _in_place(scores, _softmax_rows)


def gelu_tanh_(x: mx.array) -> mx.array:
    """GELU, tanh approximation (``nn.gelu_approx``), computed in place; returns ``x``."""
    return _in_place(x, _gelu_rows)


def _softmax_rows(x: np.ndarray) -> None:
    x -= x.max(axis=-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=-1, keepdims=True)


def _gelu_rows(x: np.ndarray) -> None:
    t = x * x
    t *= 0.044715 * _SQRT_2_OVER_PI
    t += _SQRT_2_OVER_PI
    t *= x  # sqrt(2/pi) * (x + 0.044715 x^3)
    np.tanh(t, out=t)
    t += 1.0
    t *= 0.5
    x *= t


def _in_place(x: mx.array, fn: Callable[[np.ndarray], None]) -> mx.array:
    mx.eval(x)
    view = np.asarray(x)
    if not (view.flags.writeable and view.flags.c_contiguous):
        # not expected from a matmul's or a linear layer's output; stay correct anyway
        x = mx.array(view)
        mx.eval(x)
        view = np.asarray(x)
    rows = view.reshape(-1, view.shape[-1])
    workers = cpu_workers()
    cuts = [len(rows) * i // workers for i in range(workers + 1)]
    chunks = [rows[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    if len(chunks) == 1:
        fn(chunks[0])
    else:
        list(_executor().map(fn, chunks))
    return x


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(cpu_workers(), thread_name_prefix="mlx_llama3v-cpu")
    return _pool
