"""Give MLX's Linux CPU backend an optimised BLAS.

MLX's Linux CPU wheel links the reference BLAS; its float32 matrix products run
about 29x faster with OpenBLAS. Symbol lookups of a library opened later search
the process's global scope first, so opening OpenBLAS with ``RTLD_GLOBAL`` before
``mlx.core`` is first imported makes MLX's ``cblas_sgemm`` resolve to OpenBLAS,
as ``LD_PRELOAD`` would. Set ``MLX_LLAMA3V_BLAS`` to a library path to choose one,
or to ``0`` to keep MLX's own. Does nothing on macOS (MLX uses Accelerate/Metal).

MLX also sends matrix-vector products (every layer of token-by-token decoding) to
``cblas_sgemm``, where OpenBLAS packs the whole weight matrix first: about 5x slower
than its ``cblas_sgemv``. ``_sgemm_gemv.c`` is a ``cblas_sgemm`` that answers those
through ``sgemv`` and forwards the rest to OpenBLAS; it is compiled once with the
system C compiler (cached under ``~/.cache/mlx_llama3v``) and opened ahead of
OpenBLAS. Without a compiler, or with ``MLX_LLAMA3V_GEMV=0``, OpenBLAS serves alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
)

loaded: str | None = None
gemv_shim: str | None = None  # the compiled sgemm->sgemv library, when in use
_handle = None
_shim = None


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
        shim = _open_gemv_shim()  # first: its cblas_sgemm must win the global lookup
        try:
            _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            loaded = path
        except OSError:
            loaded = None
        if loaded and shim:
            _connect_gemv_shim(shim)
    return loaded


def _open_gemv_shim() -> str | None:
    """Open the compiled shim globally (kept in ``_shim``); its path, or None."""
    global _shim
    if os.environ.get("MLX_LLAMA3V_GEMV", "1") == "0":
        return None
    library = _build_gemv_shim()
    if library is None:
        return None
    try:
        _shim = ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return str(library)


def _connect_gemv_shim(path: str) -> None:
    """Hand OpenBLAS's own sgemm/sgemv to the shim (a missing one leaves it forwarding)."""
    global gemv_shim
    sgemm, sgemv = (getattr(_handle, name, None) for name in ("cblas_sgemm", "cblas_sgemv"))
    as_pointer = lambda f: None if f is None else ctypes.cast(f, ctypes.c_void_p)
    _shim.mlx_llama3v_sgemm_init(as_pointer(sgemm), as_pointer(sgemv))
    if sgemm is not None and sgemv is not None:
        gemv_shim = path


def _build_gemv_shim() -> Path | None:
    """The compiled shim (built on first use, cached by source hash), or None."""
    source = Path(__file__).with_name("_sgemm_gemv.c")
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if not source.exists():
        return None
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_llama3v"
    library = cache / f"sgemm_gemv-{digest}.so"
    if library.exists():
        return library
    if compiler is None:
        return None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / library.name
            cmd = [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source), "-ldl"]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(built, library)  # atomic: a concurrent import sees all or nothing
    except (OSError, subprocess.SubprocessError):
        return None
    return library


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
