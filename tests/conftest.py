"""Test setup: import the package first so MLX gets the optimised BLAS on Linux."""

import mlx_llama3v  # noqa: F401  (must precede the first mlx.core import)
import torch

torch.manual_seed(0)
torch.set_num_threads(2)


# ------------------------------------------------------------------ shared fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A converted tiny MiniCPM model, images and a training data file, built once a session."""
    from test_train_support import TinySetup

    return TinySetup(tmp_path_factory.mktemp("tiny-setup"))
