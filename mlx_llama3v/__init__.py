"""mlx-llama3v: run, convert, embed for and fine-tune Llama 3-V style models with MLX.

Importing the package is cheap: submodules load on first use. On Linux it first
puts the pip-installed OpenBLAS behind MLX's BLAS calls (``cpu.link_blas``), which
only works before ``mlx.core`` is imported anywhere in the process; the rest of the
Linux CPU machinery waits for ``mlx_llama3v.cpu.enable()`` (the commands call it).

``load``, ``generate`` and ``stream_generate`` are imported from their modules
(``loading``, ``generation.generate``) the first time they are asked for.
"""

from .cpu import link_blas

link_blas()  # before any mlx.core import: libmlx.so binds cblas_sgemm when it loads

import importlib  # noqa: E402

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "load": "loading",
    "generate": "generation.generate",
    "stream_generate": "generation.generate",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
