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
linux_only = pytest.mark.skipif(
    not LINUX_CPU, reason="the BLAS forwarder is for MLX's Linux CPU backend"
)


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
    assert os.path.dirname(os.path.realpath(cpu.blas.forwarder)) == os.path.dirname(
        os.path.realpath(cpu.__file__)
    )
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
    assert eval(calls) == {
        "sgemm": 1,
        "sgemv": 0,
        "dgemm": 0,
        "cgemm": 0,
        "small": 0,
        "small_split": 0,
    }
    assert "sgemv" not in line
    few_rows = code.replace("mx.ones((1, 64))", "mx.ones((4, 64))")
    calls, line = _python(few_rows).splitlines()
    assert eval(calls)["small"] == 1 and eval(calls)["sgemm"] == 0
    assert "2-16-row products to its own kernel" in line
    calls, line = _python(few_rows, MLX_LLAMA3V_SMALL_M="0").splitlines()
    assert eval(calls)["small"] == 0 and eval(calls)["sgemm"] == 1
    assert "its own kernel" not in line
    calls, line = _python(few_rows, MLX_LLAMA3V_SMALL_M="3").splitlines()
    assert eval(calls)["small"] == 0 and eval(calls)["sgemm"] == 1  # 4 rows > 3
    assert "2-3-row products to its own kernel" in line
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


def _forwarder_sgemm():
    """The forwarder's own cblas_sgemm (what MLX calls), callable on numpy arrays."""
    import ctypes

    f = cpu.blas.shim.cblas_sgemm
    i, p = ctypes.c_int, ctypes.c_void_p
    f.argtypes = [i] * 6 + [ctypes.c_float, p, i, p, i, ctypes.c_float, p, i]

    def sgemm(a, b, c, trans_b, alpha, beta, m, n, k):
        """c[:m, :n] = alpha a[:m, :k] op(b) + beta c; row strides from the (padded) arrays."""
        f(
            101,
            111,
            112 if trans_b else 111,
            m,
            n,
            k,
            alpha,
            a.ctypes.data,
            a.strides[0] // 4,
            b.ctypes.data,
            b.strides[0] // 4,
            beta,
            c.ctypes.data,
            c.strides[0] // 4,
        )

    return sgemm


def _check_small_m(m, k, n, trans_b, alpha, beta, rng, sgemm, pad=(0, 0, 0)):
    """One product through the forwarder on padded, strided operands, against float64 numpy."""
    a = rng.standard_normal((m, k + pad[0])).astype(np.float32)
    b = rng.standard_normal((n, k + pad[1]) if trans_b else (k, n + pad[1])).astype(np.float32)
    c = rng.standard_normal((m, n + pad[2])).astype(np.float32)
    if beta == 0.0:
        c[:, :n] = np.nan  # stale output memory: beta 0 must never read it
    before = c.copy()
    op_b = b[:, :k].T if trans_b else b[:, :n]
    want = alpha * (a[:, :k].astype(np.float64) @ op_b.astype(np.float64))
    if beta != 0.0:
        want += beta * before[:, :n]
    sgemm(a, b, c, trans_b, alpha, beta, m, n, k)
    assert not np.isnan(c[:, :n]).any(), (m, k, n, trans_b, alpha, beta)
    np.testing.assert_allclose(c[:, :n], want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    np.testing.assert_array_equal(c[:, n:], before[:, n:])  # the padding of C is not written


@linux_only
@pytest.mark.parametrize("trans_b", [True, False], ids=["B_NxK", "B_KxN"])
@pytest.mark.parametrize("m", range(2, cpu.SMALL_M_MAX + 1))
def test_few_row_products_take_the_small_m_kernel_and_equal_numpy(m, trans_b):
    """Every M of the kernel, both layouts MLX uses for x @ W.T and x @ W, alpha/beta,
    strided lda/ldb/ldc, NaN in C with beta 0, K and N not multiples of 8 (N: every
    remainder of the 4-, 3- and 2-row tiles and the 16-row chunks), tiny sizes
    (N == 1 is sgemv's: test_matrix_vector_products_equal_numpy)."""
    assert cpu.blas.small_m == cpu.SMALL_M_MAX
    sgemm, rng = _forwarder_sgemm(), np.random.default_rng(m)
    # K: below, at and between the kernel's steps of 8 and 16 floats, with tails of each
    shapes = [(1, 2), (2, 3), (7, 3), (8, 16), (24, 50), (37, 29), (48, 23), (64, 33)]
    shapes += [(130, 67), (9, 16), (1037, 19)]
    before = cpu.blas_calls()
    calls = 0
    for k, n in shapes:
        for alpha, beta in [(1.0, 0.0), (0.5, 2.0), (-1.5, 0.0), (1.0, 1.0), (0.0, 0.5)]:
            _check_small_m(m, k, n, trans_b, alpha, beta, rng, sgemm)
            _check_small_m(m, k, n, trans_b, alpha, beta, rng, sgemm, pad=(3, 5, 2))
            calls += 2
    after = cpu.blas_calls()
    assert after["small"] - before["small"] == calls
    assert after["sgemm"] == before["sgemm"] and after["sgemv"] == before["sgemv"]


@linux_only
def test_products_outside_the_kernel_still_go_to_sgemm():
    sgemm, rng = _forwarder_sgemm(), np.random.default_rng(1)
    before = cpu.blas_calls()
    _check_small_m(cpu.SMALL_M_MAX + 1, 40, 24, True, 1.0, 0.0, rng, sgemm)
    _check_small_m(cpu.SMALL_M_MAX + 1, 40, 24, False, 0.5, 2.0, rng, sgemm)
    after = cpu.blas_calls()
    assert after["sgemm"] - before["sgemm"] == 2 and after["small"] == before["small"]
    a = mx.array(rng.standard_normal((40, 4)).astype(np.float32))  # A transposed: sgemm
    w = mx.array(rng.standard_normal((24, 40)).astype(np.float32))
    np.testing.assert_allclose(a.T @ w.T, np.asarray(a).T @ np.asarray(w).T, rtol=1e-4, atol=1e-4)
    assert cpu.blas_calls()["sgemm"] > after["sgemm"]


@linux_only
@pytest.mark.parametrize("trans_b", [True, False], ids=["B_NxK", "B_KxN"])
def test_large_few_row_products_split_over_the_pool_equal_numpy(trans_b):
    """Split over 3 threads from a tiny threshold: part edges at odd N, all M, alpha/beta;
    also from several threads at once (MLX streams), where one waits or runs alone."""
    from concurrent.futures import ThreadPoolExecutor

    sgemm, rng = _forwarder_sgemm(), np.random.default_rng(2)
    threads = cpu._blas_threads(cpu.blas.handle)
    assert cpu.set_small_m(cpu.SMALL_M_MAX, 3, 1) == cpu.SMALL_M_MAX
    try:
        before = cpu.blas_calls()["small_split"]
        for m in (2, 3, 5, 8, 16):
            # N = 1000: 63 strips of 16 in 24 chunks the threads take one at a time
            for k, n in [(33, 100), (64, 17), (5, 49), (1037, 35), (40, 1000)]:
                _check_small_m(m, k, n, trans_b, 1.0, 0.0, rng, sgemm, pad=(1, 3, 2))
                _check_small_m(m, k, n, trans_b, 0.5, 2.0, rng, sgemm)
        for _ in range(300):  # back to back: a worker waking late must not take a chunk
            _check_small_m(3, 8, 70, trans_b, 1.0, 0.0, rng, sgemm)  # of the next product
        assert cpu.blas_calls()["small_split"] - before == 350
        seeds = range(24)
        with ThreadPoolExecutor(4) as pool:
            list(
                pool.map(
                    lambda s: _check_small_m(
                        4, 70, 90, trans_b, 1.0, 0.0, np.random.default_rng(s), sgemm
                    ),
                    seeds,
                )
            )
    finally:
        cpu.set_small_m(cpu.SMALL_M_MAX, threads, 0)


@linux_only
def test_mlx_batched_products_and_linear_layers_reach_the_small_m_kernel():
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((4, 96)).astype(np.float32))
    w = mx.array(rng.standard_normal((96, 130)).astype(np.float32))
    linear = nn.Linear(96, 77)
    before = cpu.blas_calls()
    got_matmul = mx.matmul(x, w)
    got_linear = linear(x)
    mx.eval(got_matmul, got_linear)
    after = cpu.blas_calls()
    assert after["small"] - before["small"] == 2, (
        "MLX's 4-row products did not reach the small-M kernel"
    )
    assert after["sgemm"] == before["sgemm"]
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(got_matmul, x64 @ np.asarray(w, np.float64), rtol=1e-4, atol=1e-4)
    want = x64 @ np.asarray(linear.weight, np.float64).T + np.asarray(linear.bias)
    np.testing.assert_allclose(got_linear, want, rtol=1e-4, atol=1e-4)


@linux_only
def test_the_pool_survives_fork():
    """A forked child has none of the parent's pool workers: it starts its own (called
    through ctypes: MLX itself cannot evaluate in a child forked after it has run)."""
    code = (
        "import os, numpy as np; from mlx_llama3v import cpu; from tests.test_cpu import _forwarder_sgemm\n"
        "cpu.set_small_m(16, 2, 1); sgemm = _forwarder_sgemm()\n"
        "a, b = np.ones((4, 64), np.float32), np.ones((256, 64), np.float32)\n"
        "def product():\n"
        "    c = np.full((4, 256), np.nan, np.float32); sgemm(a, b, c, True, 1.0, 0.0, 4, 256, 64); return c\n"
        "assert (product() == 64).all()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    import signal; signal.alarm(30)  # a hung child must not outlive the test\n"
        "    os._exit(0 if (product() == 64).all() and cpu.blas_calls()['small_split'] >= 2 else 1)\n"
        "print(os.waitpid(pid, 0)[1])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


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
        [sys.executable, "-c", code],
        env=dict(env, HOME=str(home), CC="/nonexistent-cc"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "1"
    assert list(home.iterdir()) == []


@linux_only
def test_the_generate_command_switches_it_on_and_says_so_with_verbose():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shapes = os.path.join(root, "examples", "shapes")
    cmd = [
        sys.executable,
        "-m",
        "mlx_llama3v.generate",
        "--model",
        os.path.join(shapes, "model"),
        "--image",
        os.path.join(shapes, "samples", "1.png"),
        "--prompt",
        "What colour is the triangle?",
        "--max-tokens",
        "3",
        "--verbose",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert (
        "BLAS: scipy-openblas32 via mlx_llama3v's forwarder, one-row products to sgemv, "
        "2-16-row products to its own kernel; "
        "tower: numpy softmax/GELU over" in out.stderr
    )
