"""Test setup: import the package first so MLX gets the optimised BLAS on Linux."""

import mlx_llama3v  # noqa: F401  (must precede the first mlx.core import)
import torch

torch.manual_seed(0)
torch.set_num_threads(2)
