"""Vision-encoder speed, MLX vs PyTorch, side by side on the same random weights.

Rows:
- SigLIP-so400m at 384 px (27 layers, width 1152, 729 patches): MLX vs
  transformers' ``SiglipVisionModel``.
- One MiniCPM-Llama3-V 2.5 tile (448 x 448 -> 1024 patches) through the NaViT tower
  (strip layout) and the resampler (96 queries, width 4096): MLX vs transformers'
  ``Idefics2VisionTransformer`` + the PyTorch resampler reference from the tests.

Also prints the machine's float32 matmul peak (best of a large MLX, numpy and
torch matmul) and the share of it each MLX row achieves. "MLX" is the product path
(``VisionTower.encode`` after ``mlx_llama3v.cpu.enable()``, as the commands run it; on
a Linux CPU its softmax and GELU run in numpy's SIMD kernels, see ``mlx_llama3v/cpu.py``);
"MLX ops only" is the same call with ``MLX_LLAMA3V_CPU_KERNELS=0`` (every op in MLX,
tiles split over one CPU stream per core). The SigLIP row also runs mlx-vlm's SigLIP
``VisionModel`` (``pip install mlx-vlm``, benchmark only) in the same process, on the same
weights and the same BLAS. PyTorch runs in a child process that never imports
``mlx_llama3v``: the BLAS forwarder that package opens globally for MLX could otherwise
also serve PyTorch's BLAS calls. Both sides build the same weights from the same
seeds. Float32 throughout (MLX's CPU float16 matmuls are slow).
Run: ``python benchmarks/vision.py [--batch 2] [--only siglip]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from so400m import SO400M  # noqa: E402


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 3072) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    t_mlx = timed(lambda: mx.eval(a @ b), 3)
    an, bn = np.asarray(a), np.asarray(b)
    t_np = timed(lambda: an @ bn, 3)
    return 2 * n**3 / min(t_mlx, t_np) / 1e9


def encoder_flops(tokens: int, width: int, mlp: int, layers: int, patch_in: int) -> float:
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return layers * per_layer + 2 * tokens * patch_in * width


def tiles_for(kind: str, batch: int):
    side = 384 if kind == "siglip" else 448
    return [
        np.random.default_rng(i).uniform(-1, 1, (side, side, 3)).astype(np.float32)
        for i in range(batch)
    ]


def torch_model(kind: str, batch: int):
    """(forward function, modules) of the PyTorch side, weights fixed by seeds."""
    import torch
    from references import TorchResampler, randomize, strip_nchw

    torch.manual_seed(0)
    tiles = tiles_for(kind, batch)
    if kind == "siglip":
        from transformers import SiglipVisionConfig, SiglipVisionModel

        cfg = SiglipVisionConfig(**SO400M, image_size=384)
        cfg._attn_implementation = "sdpa"
        hf = SiglipVisionModel(cfg).eval()
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()

        @torch.inference_mode()
        def run():
            return hf(pixel_values=x).last_hidden_state

        return run, (hf,)
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    cfg = Idefics2VisionConfig(**SO400M, image_size=980)
    cfg._attn_implementation = "sdpa"
    hf = Idefics2VisionTransformer(cfg).eval()
    ref = randomize(TorchResampler(96, 4096, 1152), seed=1)
    xs, mask = strip_nchw(tiles, 14)

    @torch.inference_mode()
    def run():
        h = hf(pixel_values=xs, patch_attention_mask=mask).last_hidden_state
        return ref(h, [(32, 32)] * batch)

    return run, (hf, ref)


def torch_worker(kind: str, batch: int, repeats: int, out: str) -> None:
    import torch

    run, _ = torch_model(kind, batch)
    seconds = timed(run, repeats)
    np.save(out, run().numpy())
    a, b = torch.randn(3072, 3072), torch.randn(3072, 3072)
    peak = 2 * 3072**3 / timed(lambda: a @ b, 3) / 1e9
    print(json.dumps({"seconds": seconds, "peak": peak}))


def torch_side(kind: str, batch: int, repeats: int):
    """Best time, output and matmul GFLOP/s of the PyTorch side, in a clean child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/out.npy"
        cmd = [
            sys.executable,
            __file__,
            "--torch-worker",
            kind,
            "--batch",
            str(batch),
            "--repeats",
            str(repeats),
            "--out",
            out,
        ]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(res.stdout.strip().splitlines()[-1])
        return result["seconds"], np.load(out), result["peak"]


def mlx_side(kind: str, batch: int):
    """(product path, MLX-ops-only path) of the MLX side, on the PyTorch side's weights."""
    import mlx.core as mx
    from references import to_mlx

    from mlx_llama3v.config import ProjectorConfig, VisionConfig
    from mlx_llama3v.models.projector import build_projector
    from mlx_llama3v.models.vision import VisionTower

    _, modules = torch_model(kind, batch)
    tiles = tiles_for(kind, batch)
    if kind == "siglip":
        tower = VisionTower(VisionConfig.from_dict(dict(SO400M, image_size=384)))
        project = lambda f, b: f
    else:
        cfg = dict(SO400M, image_size=980, variant="navit", strip_positions=True)
        tower = VisionTower(VisionConfig.from_dict(cfg))
        proj = build_projector(ProjectorConfig(kind="resampler", num_queries=96))
        proj.load_weights(list(proj.sanitize(to_mlx(modules[1].state_dict())).items()), strict=True)
        project = proj
    tower.load_weights(list(tower.sanitize(to_mlx(modules[0].state_dict())).items()), strict=True)
    mx.eval(tower.parameters())
    if kind != "siglip":
        mx.eval(proj.parameters())

    def product():
        return mx.concatenate([project(f, b) for _, b, f in tower.encode(tiles)])

    def mlx_ops_only():
        before = os.environ.get("MLX_LLAMA3V_CPU_KERNELS")
        os.environ["MLX_LLAMA3V_CPU_KERNELS"] = "0"
        try:
            return product()
        finally:
            if before is None:
                del os.environ["MLX_LLAMA3V_CPU_KERNELS"]
            else:
                os.environ["MLX_LLAMA3V_CPU_KERNELS"] = before

    vlm = mlx_vlm_siglip(modules[0], tiles) if kind == "siglip" else None
    return product, mlx_ops_only, vlm


def _mlx_vlm_module(name: str):
    """An mlx-vlm module without running ``mlx_vlm/__init__`` (which imports its whole
    server and audio stack); None when mlx-vlm is not installed."""
    import importlib
    import importlib.util
    import types

    if "mlx_vlm" not in sys.modules:
        spec = importlib.util.find_spec("mlx_vlm")
        if spec is None:
            return None
        root = spec.submodule_search_locations[0]
        for pkg, path in (
            ("mlx_vlm", root),
            ("mlx_vlm.models.paligemma", f"{root}/models/paligemma"),
        ):
            stub = types.ModuleType(pkg)
            stub.__path__ = [path]
            sys.modules[pkg] = stub
    return importlib.import_module(name)


def mlx_vlm_siglip(hf, tiles):
    """mlx-vlm's SigLIP ``VisionModel`` on the same weights: a function returning its
    features after ``post_layernorm`` for the whole batch, or None without mlx-vlm."""
    import mlx.core as mx
    from references import to_mlx

    vision = _mlx_vlm_module("mlx_vlm.models.paligemma.vision")
    if vision is None:
        return None
    config = _mlx_vlm_module("mlx_vlm.models.paligemma.config")
    fields = config.VisionConfig.__dataclass_fields__
    model = vision.VisionModel(
        config.VisionConfig(
            **{k: v for k, v in dict(SO400M, image_size=384).items() if k in fields}
        )
    )
    weights = {  # transformers 5 names them without the "vision_model." level
        k if k.startswith("vision_model.") else f"vision_model.{k}": v
        for k, v in to_mlx(hf.state_dict()).items()
    }
    weights = {k: v for k, v in weights.items() if not k.startswith("vision_model.head.")}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    x = mx.array(np.stack(tiles))

    def run():
        # its encoder returns the first image's last state (x[0]); take every image's
        _, _, states = model(x, output_hidden_states=True)
        return model.vision_model.post_layernorm(states[-1])

    return run


def flops_of(kind: str, batch: int) -> float:
    if kind == "siglip":
        return batch * encoder_flops(729, 1152, 4304, 27, 3 * 14 * 14)
    return batch * (
        encoder_flops(1024, 1152, 4304, 27, 3 * 14 * 14)
        + 2 * 1024 * 1152 * 4096  # kv_proj
        + 2 * 2 * 1024 * 4096 * 4096  # k, v in-projections
        + 4 * 96 * 1024 * 4096  # attention
        + 2 * 96 * 4096 * 4096 * 3  # q in-proj, out_proj, proj
    )


NAMES = {"siglip": "SigLIP-so400m 384px", "minicpm": "MiniCPM 448px tile (NaViT+resampler)"}


def bench(kind: str, batch: int, repeats: int):
    import mlx.core as mx

    product, mlx_ops_only, vlm = mlx_side(kind, batch)
    t_mlx = timed(lambda: mx.eval(product()), repeats)
    t_one = timed(lambda: mx.eval(mlx_ops_only()), repeats)
    t_vlm = timed(lambda: mx.eval(vlm()), repeats) if vlm else None
    t_torch, ref, torch_peak = torch_side(kind, batch, repeats)
    check = float(np.abs(np.array(product()) - ref).max())
    if vlm:
        check = max(check, float(np.abs(np.array(vlm()) - ref).max()))
    return (
        NAMES[kind],
        batch,
        t_mlx,
        t_one,
        t_vlm,
        t_torch,
        flops_of(kind, batch),
        check,
    ), torch_peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", choices=list(NAMES), help="one row only")
    ap.add_argument("--torch-worker", choices=list(NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_worker:
        return torch_worker(args.torch_worker, args.batch, args.repeats, args.out)

    import mlx_llama3v.cpu  # the package links the BLAS for MLX on Linux, before mlx.core
    import torch

    mlx_llama3v.cpu.enable()
    peak = matmul_peak()
    kinds = [args.only] if args.only else list(NAMES)
    rows, torch_peaks = zip(*[bench(kind, args.batch, args.repeats) for kind in kinds])
    peak = max(peak, matmul_peak(), *torch_peaks)  # a busy machine lowers some of them
    print(
        f"float32 matmul peak (best 3072^2 product of MLX, numpy and torch, before and after): {peak:.0f} GFLOP/s"
    )
    print(
        f"MLX {mlx_llama3v.cpu.describe()}; torch threads: {torch.get_num_threads()} (own process)"
    )
    head = (
        f"| {'model':38} | batch | MLX img/s | MLX ops only img/s | mlx-vlm img/s | torch img/s "
        "| vs torch | vs mlx-vlm | MLX GFLOP/s | % of peak | torch % of peak | max abs diff |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, batch, t_mlx, t_one, t_vlm, t_torch, flops, check in rows:
        vlm = f"{batch / t_vlm:13.3f}" if t_vlm else f"{'-':>13}"
        vs_vlm = f"{t_vlm / t_mlx:9.2f}x" if t_vlm else f"{'-':>10}"
        print(
            f"| {name:38} | {batch:5} | {batch / t_mlx:9.3f} | {batch / t_one:18.3f} | {vlm} | {batch / t_torch:11.3f} "
            f"| {t_torch / t_mlx:7.2f}x | {vs_vlm} | {flops / t_mlx / 1e9:11.0f} | {100 * flops / t_mlx / 1e9 / peak:8.0f}% "
            f"| {100 * flops / t_torch / 1e9 / peak:14.0f}% | {check:12.2e} |"
        )


if __name__ == "__main__":
    main()
