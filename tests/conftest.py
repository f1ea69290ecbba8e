"""Test setup: the Linux CPU speed-ups on, as the commands have them (``mlx_llama3v.cpu``)."""

import mlx_llama3v.cpu  # noqa: F401  (the package links the BLAS before mlx.core loads)
import torch

mlx_llama3v.cpu.enable()
torch.manual_seed(0)
torch.set_num_threads(2)
