"""The Linux CPU machinery (``mlx_llama3v.cpu``): the BLAS MLX's products reach, the
sgemv routing of one-row products, the numpy tower kernels and how they switch on."""

import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_llama3v import cpu

LINUX_CPU = sys.platform.startswith("linux") and cpu._wanted() is None
linux_only = pytest.mark.skipif(not LINUX_CPU, reason="the BLAS forwarder is for MLX's Linux CPU backend")


def _python(code: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@linux_only
def test_mlx_float32_products_reach_the_pip_installed_openblas():
    import scipy_openblas32

    assert cpu.blas.library, cpu.describe()
    wheel = os.path.realpath(scipy_openblas32.get_lib_dir())
    # the function answering MLX's products lives in the wheel's library, not a system one
    assert os.path.dirname(cpu.blas_origin()) == wheel
    assert os.path.dirname(os.path.realpath(cpu.blas.forwarder)) == os.path.dirname(os.path.realpath(cpu.__file__))
    before = cpu.blas_calls()
    a, b, x = mx.random.normal((64, 48)), mx.random.normal((48, 32)), mx.random.normal((1, 48))
    mx.eval(a @ b, x @ b)
    after = cpu.blas_calls()
    assert after["sgemm"] > before["sgemm"], "MLX's matrix product did not reach the forwarder"
    assert after["sgemv"] > before["sgemv"], "a one-row product was not routed to sgemv"
    assert "scipy-openblas32" in cpu.describe()


@linux_only
def test_float64_products_are_forwarded_too():
    a = np.random.default_rng(0).standard_normal((20, 30))
    before = cpu.blas_calls()["dgemm"]
    a64 = mx.array(a, dtype=mx.float64)
    got = mx.matmul(a64, a64.T, stream=mx.cpu)
    assert got.dtype == mx.float64
    np.testing.assert_allclose(np.asarray(got), a @ a.T, rtol=1e-12, atol=1e-12)
    assert cpu.blas_calls()["dgemm"] > before


@linux_only
def test_importing_mlx_first_keeps_its_reference_blas_and_says_so():
    code = (
        "import mlx.core as mx; from mlx_llama3v import cpu; "
        "mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8))); print(cpu.blas_calls()['sgemm']); print(cpu.describe())"
    )
    calls, line = _python(code).splitlines()
    assert calls == "0"
    assert "mlx.core was imported before mlx_llama3v" in line


@linux_only
def test_switches_turn_the_blas_and_the_sgemv_routing_off():
    code = (
        "from mlx_llama3v import cpu; import mlx.core as mx; "
        "mx.eval(mx.ones((1, 64)) @ mx.ones((64, 64))); print(cpu.blas_calls()); print(cpu.describe())"
    )
    calls, line = _python(code, MLX_LLAMA3V_GEMV="0").splitlines()
    assert eval(calls) == {"sgemm": 1, "sgemv": 0, "dgemm": 0, "cgemm": 0}
    assert "sgemv" not in line
    calls, line = _python(code, MLX_LLAMA3V_BLAS="0").splitlines()
    assert eval(calls)["sgemm"] == 0
    assert line.startswith("BLAS: MLX's own (MLX_LLAMA3V_BLAS=0)")


def test_tower_kernels_wait_for_enable(monkeypatch):
    monkeypatch.setattr(cpu, "_enabled", False)
    assert "enable() not called" in cpu.describe()
    assert cpu.tower_groups() == 1
    calls = []
    monkeypatch.setattr(cpu, "softmax_", lambda s: calls.append(1))
    out = cpu.encode_groups(lambda k: cpu.attention(*[mx.ones((1, 2, 3, 4))] * 3, scale=0.5), 1)
    assert calls == [] and out[0].shape == (1, 2, 3, 4)


def _operands(shape, transposed, rng):
    """An MLX array of ``shape``, stored transposed when asked (MLX may pass a trans flag)."""
    a = rng.standard_normal(shape[::-1] if transposed else shape).astype(np.float32)
    return (mx.array(a).T, a.T) if transposed else (mx.array(a), a)


@pytest.mark.parametrize("ta", [False, True])
@pytest.mark.parametrize("tb", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 64, 300), (300, 64, 1), (1, 1, 7), (5, 33, 1), (2, 16, 3)])
def test_matrix_vector_products_equal_numpy(m, k, n, ta, tb):
    rng = np.random.default_rng(m * 100 + n)
    a, a_np = _operands((m, k), ta, rng)
    b, b_np = _operands((k, n), tb, rng)
    want = a_np.astype(np.float64) @ b_np.astype(np.float64)
    np.testing.assert_allclose(a @ b, want, rtol=1e-4, atol=1e-4)
    c_np = rng.standard_normal((m, n)).astype(np.float32)
    got = mx.addmm(mx.array(c_np), a, b, alpha=0.5, beta=2.0)
    np.testing.assert_allclose(got, 0.5 * want + 2.0 * c_np, rtol=1e-4, atol=1e-4)


def test_matrix_vector_product_ignores_stale_output_memory():
    """beta = 0 must not read the (reused, here NaN-filled) output buffer."""
    w = mx.random.normal((512, 256))
    x = mx.random.normal((1, 256))
    want = np.asarray(w, np.float64) @ np.asarray(x, np.float64).T
    for _ in range(5):
        nan = mx.full((1, 512), mx.nan)
        mx.eval(nan)
        del nan  # its buffer returns to MLX's cache and may back the next output
        np.testing.assert_allclose(x @ w.T, want.T, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(w @ x.T, want, rtol=1e-4, atol=1e-4)


def test_numpy_kernels_equal_mlx_softmax_and_gelu_in_place():
    x = mx.random.normal((3, 5, 40)) * 8
    x = mx.where(mx.random.uniform(shape=x.shape) < 0.3, -mx.inf, x)  # masked keys
    x[..., 0] = 1.0  # every row keeps one finite entry
    want = mx.softmax(x, axis=-1)
    mx.eval(x, want)
    got = cpu.softmax_(x)
    assert got is x  # computed in MLX's own buffer, no copy
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)

    h = mx.random.normal((7, 300)) * 6
    want = nn.gelu_approx(h)
    mx.eval(h, want)
    np.testing.assert_allclose(cpu.gelu_tanh_(h), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["transposed", "broadcast"])
def test_numpy_kernels_fall_back_to_mlx_on_buffers_they_cannot_write(layout):
    base = mx.random.normal((6, 40)) * 4
    x = base.T if layout == "transposed" else mx.broadcast_to(base[:1], (6, 40))
    mx.eval(x)
    kept = np.array(base)
    np.testing.assert_allclose(cpu.softmax_(x), mx.softmax(x, axis=-1), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cpu.gelu_tanh_(x), nn.gelu_approx(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(base), kept)  # the source is untouched


def test_none_of_it_loads_on_macos_or_with_mlx_cuda(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert cpu._wanted().startswith("not Linux")
    monkeypatch.setattr(sys, "platform", "linux")
    real = cpu.importlib.metadata.version
    fake = lambda name: "0.32.4" if name == "mlx-cuda-12" else real(name)
    monkeypatch.setattr(cpu.importlib.metadata, "version", fake)
    assert cpu._wanted() == "MLX's CUDA backend is installed (mlx-cuda-12)"
    monkeypatch.setattr(cpu, "on_cpu", lambda: False)  # e.g. a GPU device
    assert not cpu._kernels_wanted() and "not on a CPU device" in cpu.describe()


@linux_only
def test_nothing_is_built_or_written_at_import(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    code = "import mlx_llama3v, mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); print(mlx_llama3v.cpu.blas_calls()['sgemm'])"
    env = {k: v for k, v in os.environ.items() if k != "XDG_CACHE_HOME"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(env, HOME=str(home), CC="/nonexistent-cc"),
        capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "1"
    assert list(home.iterdir()) == []


@linux_only
def test_the_generate_command_switches_it_on_and_says_so_with_verbose():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shapes = os.path.join(root, "examples", "shapes")
    cmd = [
        sys.executable, "-m", "mlx_llama3v.generate", "--model", os.path.join(shapes, "model"),
        "--image", os.path.join(shapes, "samples", "1.png"), "--prompt", "What colour is the triangle?",
        "--max-tokens", "3", "--verbose",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert (
        "BLAS: scipy-openblas32 via mlx_llama3v's forwarder, one-row products to sgemv; "
        "tower: numpy softmax/GELU over" in out.stderr
    )
