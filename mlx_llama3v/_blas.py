"""Give MLX's Linux CPU backend an optimised BLAS.

MLX's Linux CPU wheel links the reference BLAS; its float32 matrix products run
about 29x faster with OpenBLAS. Symbol lookups of a library opened later search
the process's global scope first, so opening OpenBLAS with ``RTLD_GLOBAL`` before
``mlx.core`` is first imported makes MLX's ``cblas_sgemm`` resolve to OpenBLAS,
as ``LD_PRELOAD`` would. Set ``MLX_LLAMA3V_BLAS`` to a library path to choose one,
or to ``0`` to keep MLX's own. Does nothing on macOS (MLX uses Accelerate/Metal).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from contextlib import contextmanager

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None
_handle = None


def find_openblas() -> str | None:
    choice = os.environ.get("MLX_LLAMA3V_BLAS")
    if choice:
        return None if choice == "0" else choice
    for path in _CANDIDATES:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def use_fast_blas() -> str | None:
    """Open OpenBLAS globally if this is Linux and MLX is not imported yet."""
    global loaded, _handle
    if loaded or not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return loaded
    path = find_openblas()
    if path:
        try:
            _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded = path
        except OSError:
            loaded = None
    return loaded


@contextmanager
def single_threaded():
    """Run OpenBLAS on one thread inside the block (for work split over CPU streams)."""
    setter = getattr(_handle, "openblas_set_num_threads", None)
    getter = getattr(_handle, "openblas_get_num_threads", None)
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)
