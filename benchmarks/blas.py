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
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker() -> None:
    import mlx_llama3v.cpu as cpu
    import mlx.core as mx

    def best(fn, repeats):
        fn()
        out = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    n = 3072
    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    w, x = mx.random.normal((16384, 8192)), mx.random.normal((1, 8192))
    mx.eval(a, b, w, x)
    slow = cpu.blas.library is None  # the reference BLAS: one run is plenty
    gemm = best(lambda: mx.eval(a @ b), 1 if slow else 5)
    gemv = best(lambda: mx.eval(x @ w.T), 2 if slow else 10)
    print(json.dumps({"gemm": 2 * n**3 / gemm / 1e9, "gemv": w.nbytes / gemv / 1e9, "blas": cpu.describe()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mkl", help="folder holding libmkl_rt.so.* (an mkl wheel's lib)")
    ap.add_argument("--lib", action="append", default=[], help="another BLAS library to compare")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker()
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
                [sys.executable, __file__, "--worker"], env=dict(os.environ, **env),
                capture_output=True, text=True, check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            for key in ("gemm", "gemv"):
                best[name][key] = max(best[name][key], r[key])
    print(f"| BLAS (best of {args.rounds} turns) | 3072^3 sgemm GFLOP/s | 1x8192 @ 8192x16384 GB/s |\n|---|---|---|")
    for name, r in best.items():
        print(f"| {name} | {r['gemm']:.0f} | {r['gemv']:.1f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
