"""The Linux CPU machinery: an optimised BLAS for MLX, and the vision tower's CPU kernels.

MLX's Linux CPU backend is correct but slow in two places this package fixes; on
macOS, Metal or CUDA none of this loads.

1. **BLAS.** MLX's CPU wheel links the reference BLAS: float32 matrix products run
   about 29x slower than OpenBLAS. ``link_blas()`` puts scipy-openblas32 (a pip
   wheel; OpenBLAS with ``scipy_``-prefixed symbols) behind the ``cblas_*`` names
   libmlx.so calls, through ``_blas_forwarder`` (C, compiled by ``pip install``;
   see ``setup.py``), opened with ``RTLD_GLOBAL``. Python loads extension modules
   with ``RTLD_NOW``, so libmlx.so binds ``cblas_sgemm`` once, when ``mlx.core`` is
   first imported: the forwarder must be in the global scope before that, which is
   why the package's ``__init__`` calls ``link_blas()`` (the one import-order rule;
   ``describe()`` says when it came too late). The forwarder sends one-row products
   (decode) to sgemv, products of 2..16 rows (batched decode: the server's streams)
   to its own small-M kernel, split over OpenBLAS's thread count from 1M-element
   weights (in chunks the threads take in turn), and counts the calls it answers
   (``blas_calls()``).
   ``MLX_LLAMA3V_BLAS=0`` keeps MLX's own BLAS, ``MLX_LLAMA3V_BLAS=/path/lib.so``
   takes another library (plain or ``scipy_`` names, e.g. MKL's ``libmkl_rt.so``),
   ``MLX_LLAMA3V_GEMV=0`` leaves one-row products to sgemm, ``MLX_LLAMA3V_SMALL_M=0``
   leaves few-row products to sgemm (``=N``: only up to N rows).

2. **Tower kernels** (switched on by ``enable()``, which the commands call). MLX's
   x86-64 CPU build evaluates ``exp`` and ``tanh`` one element at a time (17 ns per
   element against numpy's SIMD kernels' <1 ns), so on a SigLIP-so400m tower the
   softmax and the GELU cost more than every matrix product. While the frozen
   tower encodes (``tower_kernels()``), the attention softmax and the tanh-GELU of
   float32 activations run in numpy, in place on the evaluated MLX array's memory,
   split over the cores (numpy's ufuncs release the GIL). ``attention()`` and
   ``activation()`` are the tower's one dispatch point for them. With
   ``MLX_LLAMA3V_CPU_KERNELS=0`` the tower's tile groups run on one CPU stream per
   core instead (``map_evaluated``), OpenBLAS held to one thread.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

# ------------------------------------------------------------------ BLAS


class _Blas:
    """What ``link_blas()`` did: the library MLX's products go to, or why none."""

    library: Optional[str] = None  # path of the BLAS behind the forwarder
    forwarder: Optional[str] = None  # path of _blas_forwarder, when linked
    gemv: bool = False  # one-row products routed to sgemv
    small_m: int = 0  # products of 2..small_m rows answered by the forwarder's kernel
    why_not: Optional[str] = None  # set when no optimised BLAS is in use
    handle = None
    shim = None


blas = _Blas()
_tried = False
_CUDA_DISTRIBUTIONS = ("mlx-cuda-12", "mlx-cuda-13", "mlx-cuda")
_COUNTERS = ("sgemm", "sgemv", "dgemm", "cgemm", "small", "small_split")
SMALL_M_MAX = 16  # the forwarder's SMALL_M_MAX; chosen by benchmarks/blas.py --small-m


def _wanted() -> Optional[str]:
    """None when this process should link a BLAS, else the reason it should not."""
    if not sys.platform.startswith("linux"):
        return "not Linux (MLX uses Accelerate/Metal)"
    if os.environ.get("MLX_LLAMA3V_BLAS") == "0":
        return "MLX_LLAMA3V_BLAS=0"
    for name in _CUDA_DISTRIBUTIONS:
        try:
            importlib.metadata.version(name)
            return f"MLX's CUDA backend is installed ({name})"
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def _library_path() -> Optional[str]:
    chosen = os.environ.get("MLX_LLAMA3V_BLAS")
    if chosen:
        return chosen
    try:
        import scipy_openblas32
    except ImportError:
        return None
    return os.path.join(scipy_openblas32.get_lib_dir(), f"lib{scipy_openblas32.get_library()}.so")


def _symbol(handle, name: str):
    """``scipy_name`` or ``name`` from a BLAS library, as a void pointer (None if absent)."""
    for candidate in ("scipy_" + name, name):
        f = getattr(handle, candidate, None)
        if f is not None:
            return ctypes.cast(f, ctypes.c_void_p)
    return None


def forwarder_path() -> Optional[str]:
    """The compiled ``_blas_forwarder`` (built by ``pip install``), or None."""
    try:
        spec = importlib.util.find_spec("mlx_llama3v._blas_forwarder")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin and os.path.exists(spec.origin) else None


def link_blas() -> Optional[str]:
    """Put the optimised BLAS behind MLX's ``cblas_*`` calls; its path, or None.

    Must run before ``mlx.core`` is first imported (see the module doc); idempotent.
    """
    global _tried
    if _tried:
        return blas.library
    _tried = True
    blas.why_not = _wanted()
    if blas.why_not:
        return None
    if "mlx.core" in sys.modules:
        blas.why_not = "mlx.core was imported before mlx_llama3v (MLX keeps its reference BLAS)"
        return None
    library, shim = _library_path(), forwarder_path()
    if library is None:
        blas.why_not = "scipy-openblas32 is not installed"
        return None
    if shim is None:
        blas.why_not = (
            "the BLAS forwarder was not built (reinstall with a C compiler: pip install -e .)"
        )
        return None
    try:
        handle = ctypes.CDLL(library, mode=ctypes.RTLD_LOCAL)
        sgemm, sgemv, dgemm, cgemm = (
            _symbol(handle, f"cblas_{n}") for n in ("sgemm", "sgemv", "dgemm", "cgemm")
        )
        if os.environ.get("MLX_LLAMA3V_GEMV", "1") == "0":
            sgemv = None
        # connected before it is made global: its cblas_* never run unconnected
        forwarder = ctypes.CDLL(shim, mode=ctypes.RTLD_LOCAL)
        if forwarder.mlx_llama3v_blas_connect(sgemm, sgemv, dgemm, cgemm) != 0:
            blas.why_not = f"{library} lacks cblas_sgemm/dgemm/cgemm"
            return None
        small_m = set_small_m(_small_m_limit(), _blas_threads(handle), 0, forwarder)
        forwarder = ctypes.CDLL(shim, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        blas.why_not = f"cannot open {library}: {e}"
        return None
    blas.library, blas.forwarder, blas.gemv = library, shim, sgemv is not None
    blas.small_m = small_m
    blas.handle, blas.shim = handle, forwarder
    return library


def _small_m_limit() -> int:
    value = os.environ.get("MLX_LLAMA3V_SMALL_M", str(SMALL_M_MAX))
    try:
        return max(0, min(int(value), SMALL_M_MAX))
    except ValueError:
        return SMALL_M_MAX  # like the other switches: anything but a number keeps the default


def set_small_m(limit: int, threads: int, min_split: int = -1, library=None) -> int:
    """Configure the forwarder's few-row kernel: rows up to ``limit`` (< 2: off), split
    over ``threads`` from ``N*K >= min_split`` (0: the default, -1: keep). Returns the
    limit in force (0: off or no such forwarder). For tests and benchmarks/blas.py."""
    setter = getattr(
        library if library is not None else blas.shim, "mlx_llama3v_blas_small_m", None
    )
    if setter is None:  # not linked, or a forwarder built before the kernel existed
        return 0
    setter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
    return setter(limit, threads, min_split)


def _blas_threads(handle) -> int:
    """The threads the linked BLAS uses (OPENBLAS_NUM_THREADS honoured), else the cores."""
    getter = getattr(handle, "scipy_openblas_get_num_threads", None) or getattr(
        handle, "openblas_get_num_threads", None
    )
    return int(getter()) if getter is not None else (os.cpu_count() or 1)


def blas_calls() -> dict:
    """Calls the forwarder answered so far: ``sgemm``, ``sgemv`` (routed), ``dgemm``,
    ``cgemm``, ``small`` (2..16-row products, its own kernel) and ``small_split`` (those
    of them split over its thread pool)."""
    counts = (ctypes.c_ulonglong * len(_COUNTERS))()
    if blas.shim is not None:
        blas.shim.mlx_llama3v_blas_counts(counts)
    return dict(zip(_COUNTERS, counts))


def blas_origin() -> Optional[str]:
    """The file the forwarder's sgemm calls land in (as the dynamic loader reports it)."""
    if blas.shim is None:
        return None
    origin = blas.shim.mlx_llama3v_blas_origin
    origin.restype = ctypes.c_char_p
    path = origin()
    return os.path.realpath(path.decode()) if path else None


@contextlib.contextmanager
def single_threaded():
    """Run the linked BLAS on one thread inside the block (for work split over CPU streams)."""
    h = blas.handle
    setter = getattr(h, "scipy_openblas_set_num_threads", None) or getattr(
        h, "openblas_set_num_threads", None
    )
    getter = getattr(h, "scipy_openblas_get_num_threads", None) or getattr(
        h, "openblas_get_num_threads", None
    )
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


# ------------------------------------------------------------------ switching on

_enabled = False


def enable() -> str:
    """Switch on this module's CPU speed-ups for this process (the commands call it).

    Links the BLAS if that has not happened (only possible before ``mlx.core`` is
    imported) and lets the vision tower use the numpy kernels or the per-core
    streams while it encodes. Returns ``describe()``.
    """
    global _enabled
    link_blas()
    _enabled = True
    return describe()


def on_cpu() -> bool:
    """True when MLX computes on a non-Apple CPU (where the tower kernels apply)."""
    import mlx.core as mx

    return sys.platform != "darwin" and mx.default_device() == mx.cpu


def _kernels_wanted() -> bool:
    return _enabled and on_cpu() and os.environ.get("MLX_LLAMA3V_CPU_KERNELS", "1") != "0"


def describe() -> str:
    """One line for ``--verbose``: which BLAS MLX's products reach and what else is on."""
    if blas.library:
        name = "scipy-openblas32" if "scipy_openblas" in blas.library else blas.library
        gemv = ", one-row products to sgemv" if blas.gemv else ""
        small = f", 2-{blas.small_m}-row products to its own kernel" if blas.small_m else ""
        line = f"BLAS: {name} via mlx_llama3v's forwarder{gemv}{small}"
    else:
        line = f"BLAS: MLX's own ({blas.why_not or 'link_blas() was not called'})"
    if not _enabled:
        return line + "; tower: MLX ops (mlx_llama3v.cpu.enable() not called)"
    if not on_cpu():
        return line + "; tower: MLX ops (not on a CPU device)"
    if _kernels_wanted():
        return line + f"; tower: numpy softmax/GELU over {cpu_workers()} threads"
    return line + f"; tower: MLX ops, tile groups over {cpu_workers()} CPU streams"


# ------------------------------------------------------------------ per-core streams

_streams: list = []


def cpu_workers() -> int:
    """Cores to split CPU work over (1 off the CPU)."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


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
    import mlx.core as mx

    keys = list(keys)
    if len(keys) == 1 or cpu_workers() == 1:
        outs = [fn(k) for k in keys]
        mx.eval(outs)
        return outs
    while len(_streams) < len(keys):
        _streams.append(mx.new_stream(mx.cpu))
    outs = []
    with single_threaded():
        for k, stream in zip(keys, _streams):
            with mx.stream(stream):
                outs.append(fn(k))
        mx.eval(outs)
    return outs


def encode_groups(fn: Callable[[int], T], count: int) -> List[T]:
    """Evaluate ``fn(k)`` for the tower's ``count`` tile groups the fastest way here."""
    import mlx.core as mx

    if _kernels_wanted():
        with tower_kernels():
            outs = [fn(k) for k in range(count)]
        mx.eval(outs)
        return outs
    if _enabled:
        return map_evaluated(fn, range(count))
    outs = [fn(k) for k in range(count)]
    mx.eval(outs)
    return outs


def tower_groups() -> int:
    """How many tile groups the tower should split a batch into (1 unless enabled)."""
    return cpu_workers() if _enabled else 1


# ------------------------------------------------------------------ tower kernels

_active = contextvars.ContextVar("mlx_llama3v_tower_kernels", default=False)
_pool: Optional[ThreadPoolExecutor] = None
_SQRT_2_OVER_PI = 0.7978845608028654


@contextlib.contextmanager
def tower_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``attention``/``activation`` take the numpy path for float32.

    Only for a frozen tower (in-place numpy carries no gradient); ``encode_groups``
    opens it when the kernels are switched on. Tests open it directly.
    """
    token = _active.set(enabled)
    try:
        yield
    finally:
        _active.reset(token)


def _numpy_path(x) -> bool:
    import mlx.core as mx

    return _active.get() and x.dtype == mx.float32


def attention(q, k, v, *, scale: float, mask=None):
    """The tower's attention: MLX's fused kernel, or (inside ``tower_kernels``) the
    same product with the softmax in numpy. ``mask``: boolean, True = attend."""
    import mlx.core as mx

    if not _numpy_path(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return softmax_(scores) @ v


def activation(fn: Callable) -> Callable:
    """The tower's activation ``fn``, taking the numpy GELU inside ``tower_kernels``."""
    import mlx.nn as nn

    if fn is not nn.gelu_approx:
        return fn

    def act(x):
        return gelu_tanh_(x) if _numpy_path(x) else fn(x)

    return act


def softmax_(scores):
    """Softmax over the last axis, in place when the buffer allows; returns the result.

    Masked entries are ``-inf`` (every row needs one finite entry)."""
    import mlx.core as mx

    return _in_place(scores, _softmax_rows, lambda x: mx.softmax(x, axis=-1))


def gelu_tanh_(x):
    """GELU, tanh approximation (``nn.gelu_approx``), in place when the buffer allows."""
    import mlx.nn as nn

    return _in_place(x, _gelu_rows, nn.gelu_approx)


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


def _in_place(x, fn: Callable[[np.ndarray], None], mlx_op: Callable):
    import mlx.core as mx

    mx.eval(x)
    view = np.asarray(x)
    if not (view.flags.writeable and view.flags.c_contiguous):
        # e.g. a broadcast or a transposed view: MLX's own op is correct there
        return mlx_op(x)
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
