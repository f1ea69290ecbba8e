"""mlx-llama3v: run, convert, embed for and fine-tune Llama 3-V style models with MLX.

Importing the package is cheap: submodules load on first use. On Linux it first
points MLX at an optimised BLAS when one is installed (see ``_blas``), which must
happen before ``mlx.core`` is imported anywhere in the process.
"""

from ._blas import use_fast_blas

use_fast_blas()

__version__ = "0.1.0"
