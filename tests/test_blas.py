"""The BLAS MLX gets on Linux: OpenBLAS, with matrix-vector products sent to sgemv."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_llama3v._blas as blas

LINUX_WITH_OPENBLAS = sys.platform.startswith("linux") and blas.find_openblas() is not None


@pytest.mark.skipif(not LINUX_WITH_OPENBLAS, reason="only Linux with OpenBLAS installed gets it")
def test_openblas_and_gemv_shim_are_in_use():
    assert blas.loaded
    assert blas.gemv_shim, "the sgemm->sgemv shim did not build or load (is a C compiler installed?)"


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


@pytest.mark.skipif(not LINUX_WITH_OPENBLAS, reason="only Linux with OpenBLAS installed gets it")
def test_gemv_shim_can_be_turned_off():
    code = "import mlx_llama3v._blas as b; import mlx_llama3v; print(b.gemv_shim)"
    env = dict(os.environ, MLX_LLAMA3V_GEMV="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
