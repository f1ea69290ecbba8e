"""Test setup: the Linux CPU speed-ups on, as the commands have them (``mlx_llama3v.cpu``)."""

import mlx_llama3v.cpu  # noqa: F401  (the package links the BLAS before mlx.core loads)
import torch

mlx_llama3v.cpu.enable()
torch.manual_seed(0)
torch.set_num_threads(2)


# ------------------------------------------------------------------ shared fixtures
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A converted tiny MiniCPM model, images and a training data file, built once a session."""
    from test_train_support import TinySetup

    return TinySetup(tmp_path_factory.mktemp("tiny-setup"))
