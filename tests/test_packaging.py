"""setup.py's build-time choice of MLX's Linux backend (mlx[cpu] and mlx[cuda] cannot coexist)."""

import runpy
from pathlib import Path
from unittest import mock

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def requirements(monkeypatch, backend: str) -> list[str]:
    monkeypatch.setenv("MLX_LLAMA3V_BACKEND", backend)
    seen = {}
    with mock.patch("setuptools.setup", lambda **kw: seen.update(kw)):
        runpy.run_path(str(SETUP))
    return seen["install_requires"]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_the_linux_backend_is_one_of_mlx_cpu_or_mlx_cuda(monkeypatch, backend):
    linux_mlx = [r for r in requirements(monkeypatch, backend) if r.startswith("mlx[")]
    assert linux_mlx == [f"mlx[{backend}]>=0.29; sys_platform == 'linux'"]


def test_an_unknown_backend_is_one_error(monkeypatch):
    with pytest.raises(SystemExit, match="^error: MLX_LLAMA3V_BACKEND must be cpu or cuda"):
        requirements(monkeypatch, "rocm")
