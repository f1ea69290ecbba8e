"""Which BLAS MLX's Linux CPU backend should get: the candidates side by side.

Each candidate runs in its own child process (the BLAS is linked when ``mlx.core``
loads): MLX's bundled reference BLAS (``MLX_LLAMA3V_BLAS=0``), the pip wheel
``scipy-openblas32`` behind the forwarder (the default), with ``--mkl DIR`` (the
``lib`` folder of an installed or unpacked ``mkl`` wheel) Intel's ``libmkl_rt``
behind the same forwarder, and with ``--lib PATH`` any other BLAS (e.g. a system
``libopenblas.so.0``). Rows: a float32 3072^3 matrix product
(GFLOP/s, what the vision tower and prefill are made of) and a 1 x 8192 @ 8192 x
16384 matrix-vector product (GB/s of weights streamed, what decode is made of),
best of a few runs. Each candidate runs ``--rounds`` times, taking turns (the machine's load drifts).
Run: ``python benchmarks/blas.py [--mkl DIR] [--lib PATH] [--rounds 2]``.

``--small-m`` instead weighs the forwarder's few-row kernel (batched decode: M streams
times a weight) against what it replaces, in one process, on the same numpy operands:
C (M x N) = A (M x K) @ W.T, W (N x K) row-major (a Linear weight), for M = 1, 2, 3, 4, 8,
12, 16 and, by default, the weights of a Llama-3.2-1B layer (2048 x 2048, 2048 x 8192 and
8192 x 2048; ``--sizes N`` or ``KxN``) and its LM head (2048 x 128256). Each timing cycles
through distinct weights of 256 MB in all, 8x the L3 cache here: in decoding every weight
comes from memory (the model is far larger than the caches), so a product timed on one
weight again and again, read from L3, would flatter whatever reads B twice. Columns: the
forwarder's ``cblas_sgemm`` (what MLX calls; M = 1 is its sgemv route), the same on one
thread, OpenBLAS's sgemm, and M calls of OpenBLAS's sgemv; ms a call (best of a few
cycles) and GB/s of weight bytes read (W's size / time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


OPENBLAS_IDLE_S = 0.2
COLD_BYTES = 256 << 20  # --small-m cycles through this much weight: 8x the L3 cache here


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``fn``, after one warm-up call."""
    fn()
    out = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def worker() -> None:
    import mlx_llama3v.cpu as cpu
    import mlx.core as mx

    n = 3072
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    w, x = mx.random.normal((16384, 8192)), mx.random.normal((1, 8192))
    mx.eval(a, b, w, x)
    slow = cpu.blas.library is None  # the reference BLAS: one run is plenty
    gemm = best(lambda: mx.eval(a @ b), 1 if slow else 5)
    gemv = best(lambda: mx.eval(x @ w.T), 2 if slow else 10)
    print(
        json.dumps(
            {"gemm": 2 * n**3 / gemm / 1e9, "gemv": w.nbytes / gemv / 1e9, "blas": cpu.describe()}
        )
    )


def small_m(sizes, rounds: int) -> None:
    import ctypes

    import numpy as np

    import mlx_llama3v.cpu as cpu

    if cpu.blas.shim is None or not cpu.blas.small_m:
        raise SystemExit(f"error: the forwarder's small-M kernel is not in use ({cpu.describe()})")
    i32, f32, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    forwarder, sgemm = cpu.blas.shim.cblas_sgemm, cpu.blas.handle.scipy_cblas_sgemm
    sgemv = cpu.blas.handle.scipy_cblas_sgemv
    for fn in (forwarder, sgemm):
        fn.argtypes = [i32] * 6 + [f32, ptr, i32, ptr, i32, f32, ptr, i32]
    sgemv.argtypes = [i32] * 4 + [f32, ptr, i32, ptr, i32, f32, ptr, i32]
    threads = cpu._blas_threads(cpu.blas.handle)

    def row(weights, m: int) -> str:
        n, k = weights[0].shape
        a = np.random.default_rng(m).standard_normal((m, k), dtype=np.float32)
        c = np.empty((m, n), np.float32)

        def args(w):
            return (101, 111, 112, m, n, k, 1.0, a.ctypes.data, k, w.ctypes.data, k, 0.0,
                    c.ctypes.data, n)  # fmt: skip

        def rows(w):
            for i in range(m):
                sgemv(101, 111, n, k, 1.0, w.ctypes.data, k, a[i].ctypes.data, 1, 0.0,
                      c[i].ctypes.data, 1)  # fmt: skip

        def one_thread(w):
            cpu.set_small_m(cpu.SMALL_M_MAX, 1)
            try:
                forwarder(*args(w))
            finally:
                cpu.set_small_m(cpu.blas.small_m, threads)

        candidates = {
            "fw": lambda w: forwarder(*args(w)),
            "one": one_thread,
            "gemm": lambda w: sgemm(*args(w)),
            "gemv": rows,
        }

        def cycle(fn):  # one call per weight: none of them is in a cache when it comes
            for w in weights:
                fn(w)

        repeats = max(2, min(8, int(1e9 / (weights[0].nbytes * len(weights)))))
        times = dict.fromkeys(candidates, float("inf"))
        for _ in range(rounds):  # taking turns: the machine's load drifts
            for name, fn in candidates.items():
                # OpenBLAS's threads spin ~0.1 s after a call of its own before they sleep;
                # the forwarder's pool would share the cores with them (in decoding of
                # several streams, where every large product is the forwarder's, they sleep)
                time.sleep(OPENBLAS_IDLE_S)
                per_call = best(lambda fn=fn: cycle(fn), repeats) / len(weights)
                times[name] = min(times[name], per_call)
        w = weights[0]
        want = a.astype(np.float64) @ w.T.astype(np.float64)
        forwarder(*args(w))
        assert np.abs(c - want).max() <= 1e-4 * np.abs(want).max(), (
            "the forwarder's product is wrong"
        )
        cells = [f"{t * 1e3:.2f} ({w.nbytes / t / 1e9:.1f})" for t in times.values()]
        return f"| {k} x {n} | {m} | " + " | ".join(cells) + " |"

    print(
        f"load average: {os.getloadavg()[0]:.2f} (1 min), cores: {os.cpu_count()}, BLAS threads: {threads}"
    )
    print(
        "| K x N | M | forwarder ms (GB/s) | forwarder, 1 thread | OpenBLAS sgemm | M x sgemv |\n|---|---|---|---|---|---|"
    )
    for size in sizes:
        k, n = (int(v) for v in size.split("x")) if "x" in size else (2048, int(size))
        count = max(1, -(-COLD_BYTES // (n * k * 4)))  # distinct weights: more than the caches
        rng = np.random.default_rng(0)
        weights = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(count)]
        for m in (1, 2, 3, 4, 8, 12, 16):
            print(row(weights, m), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mkl", help="folder holding libmkl_rt.so.* (an mkl wheel's lib)")
    ap.add_argument("--lib", action="append", default=[], help="another BLAS library to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--small-m", action="store_true", help="the few-row kernel vs sgemm vs M x sgemv"
    )
    ap.add_argument(
        "--sizes",
        nargs="+",
        default=["2048", "8192", "8192x2048", "128256"],
        help="weights for --small-m: N (K = 2048) or KxN",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
    if args.small_m:
        return small_m(args.sizes, args.rounds)
    candidates = {
        "MLX's reference BLAS": {"MLX_LLAMA3V_BLAS": "0"},
        "scipy-openblas32 + forwarder": {},
        "scipy-openblas32 + forwarder, sgemv routing off": {"MLX_LLAMA3V_GEMV": "0"},
    }
    if args.mkl:
        rt = sorted(f for f in os.listdir(args.mkl) if f.startswith("libmkl_rt.so"))[0]
        candidates["mkl (libmkl_rt) + forwarder"] = {
            "MLX_LLAMA3V_BLAS": os.path.join(args.mkl, rt),
            "MKL_THREADING_LAYER": "GNU",
            "LD_LIBRARY_PATH": args.mkl,
        }
    for path in args.lib:
        candidates[f"{path} + forwarder"] = {"MLX_LLAMA3V_BLAS": path}
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min), cores: {os.cpu_count()}")
    best = {name: {"gemm": 0.0, "gemv": 0.0} for name in candidates}
    for _ in range(args.rounds):
        for name, env in candidates.items():
            out = subprocess.run(
                [sys.executable, __file__, "--worker"],
                env=dict(os.environ, **env),
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            for key in ("gemm", "gemv"):
                best[name][key] = max(best[name][key], r[key])
    print(
        f"| BLAS (best of {args.rounds} turns) | 3072^3 sgemm GFLOP/s | 1x8192 @ 8192x16384 GB/s |\n|---|---|---|"
    )
    for name, r in best.items():
        print(f"| {name} | {r['gemm']:.0f} | {r['gemv']:.1f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
