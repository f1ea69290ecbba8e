"""Build steps pyproject.toml cannot express: the BLAS forwarder and the Linux MLX backend.

- ``mlx_llama3v._blas_forwarder``: a small C library (``mlx_llama3v/_blas_forwarder.c``)
  compiled by ``pip install`` on Linux; it puts scipy-openblas32 behind the ``cblas_*``
  names MLX's CPU backend calls (see ``mlx_llama3v/cpu.py``). Optional: without a C
  compiler the install still succeeds and MLX keeps its reference BLAS (slow).
- MLX's Linux backend: ``mlx[cpu]`` and ``mlx[cuda]`` install the same file
  (``mlx/lib/libmlx.so``) and cannot coexist, so the base dependencies carry the CPU
  backend only where the CUDA one is not wanted: building with
  ``MLX_LLAMA3V_BACKEND=cuda``, or on a machine with an NVIDIA driver, depends on
  ``mlx[cuda]`` instead, so the plain ``pip install -e .`` works there too (the ``cuda``
  extra says the same explicitly).
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup


def linux_backend() -> str:
    choice = os.environ.get("MLX_LLAMA3V_BACKEND", "").strip().lower()
    if choice in ("cpu", "cuda"):
        return choice
    if choice:
        sys.exit(f"error: MLX_LLAMA3V_BACKEND must be cpu or cuda, got {choice!r}")
    return "cuda" if Path("/proc/driver/nvidia/version").exists() else "cpu"


dependencies = [
    "mlx>=0.29; sys_platform == 'darwin'",
    "mlx-lm>=0.32,<0.33",  # private names behind mlx_llama3v/_mlx_lm.py; tested with 0.32.x
    "numpy>=1.24",
    "pillow>=10",
    "huggingface_hub>=0.24",
    "typer>=0.12",
    "tqdm>=4.60",
    # OpenBLAS for MLX's CPU matrix products (scipy_-prefixed symbols, ~8 MB wheel)
    "scipy-openblas32>=0.3.27; sys_platform == 'linux'",
]
if linux_backend() == "cpu":
    dependencies.append("mlx[cpu]>=0.29; sys_platform == 'linux'")
else:
    dependencies.append("mlx[cuda]>=0.29; sys_platform == 'linux'")

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "mlx_llama3v._blas_forwarder",
            sources=["mlx_llama3v/_blas_forwarder.c"],
            extra_compile_args=["-O2"],
            libraries=["dl"],  # dladdr (part of libc itself from glibc 2.34)
            optional=True,
        )
    )

setup(install_requires=dependencies, ext_modules=ext_modules)
