"""Vision-encoder speed, MLX vs PyTorch, side by side on the same random weights.

Rows:
- SigLIP-so400m at 384 px (27 layers, width 1152, 729 patches): MLX vs
  transformers' ``SiglipVisionModel``.
- One MiniCPM-Llama3-V 2.5 tile (448 x 448 -> 1024 patches) through the NaViT tower
  (strip layout) and the resampler (96 queries, width 4096): MLX vs transformers'
  ``Idefics2VisionTransformer`` + the PyTorch resampler reference from the tests.

Also prints the machine's float32 matmul peak (best of a large MLX and numpy
matmul) and the share of it each MLX row achieves. "MLX" is the product path
(``VisionTower.encode``: tiles split over one CPU stream per core); "1-stream" is
one plain batched forward. Float32 throughout (MLX's CPU
float16 matmuls are slow). Run: ``python benchmarks/vision.py [--batch 2]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx_llama3v  # noqa: F401  (optimised BLAS for MLX on Linux, before mlx.core)
import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from references import TorchResampler, randomize, strip_nchw, to_mlx  # noqa: E402

from mlx_llama3v.config import ProjectorConfig, VisionConfig  # noqa: E402
from mlx_llama3v.models.projector import build_projector  # noqa: E402
from mlx_llama3v.models.vision import VisionTower, make_tile_batch  # noqa: E402

SO400M = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    patch_size=14,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 3072) -> float:
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


def bench_siglip(batch: int, repeats: int):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**SO400M, image_size=384)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = SiglipVisionModel(cfg).eval()
    tower = VisionTower(VisionConfig.from_dict(dict(SO400M, image_size=384)))
    tower.load_weights(list(tower.sanitize(to_mlx(hf.state_dict())).items()), strict=True)
    mx.eval(tower.parameters())

    tiles = [np.random.default_rng(i).uniform(-1, 1, (384, 384, 3)).astype(np.float32) for i in range(batch)]
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()

    def run_one_stream():
        return tower(make_tile_batch(tiles, tower.config))

    def run_mlx():
        return mx.concatenate([f for _, _, f in tower.encode(tiles)])

    @torch.inference_mode()
    def run_torch():
        return hf(pixel_values=x).last_hidden_state

    flops = batch * encoder_flops(729, 1152, 4304, 27, 3 * 14 * 14)
    check = np.abs(np.array(run_one_stream()) - run_torch().numpy()).max()
    times = [timed(lambda: mx.eval(run_mlx()), repeats), timed(lambda: mx.eval(run_one_stream()), repeats)]
    return "SigLIP-so400m 384px", batch, *times, timed(run_torch, repeats), flops, check


def bench_minicpm_tile(batch: int, repeats: int):
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    cfg = Idefics2VisionConfig(**SO400M, image_size=980)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Idefics2VisionTransformer(cfg).eval()
    ref = randomize(TorchResampler(96, 4096, 1152), seed=1)
    vcfg = VisionConfig.from_dict(dict(SO400M, image_size=980, variant="navit", strip_positions=True))
    tower = VisionTower(vcfg)
    tower.load_weights(list(tower.sanitize(to_mlx(hf.state_dict())).items()), strict=True)
    proj = build_projector(ProjectorConfig(kind="resampler", num_queries=96))
    proj.load_weights(list(proj.sanitize(to_mlx(ref.state_dict())).items()), strict=True)
    mx.eval(tower.parameters(), proj.parameters())

    tiles = [np.random.default_rng(i).uniform(-1, 1, (448, 448, 3)).astype(np.float32) for i in range(batch)]
    xs, mask = strip_nchw(tiles, 14)

    def run_one_stream():
        b = make_tile_batch(tiles, vcfg)
        return proj(tower(b), b)

    def run_mlx():
        return mx.concatenate([proj(f, b) for _, b, f in tower.encode(tiles)])

    @torch.inference_mode()
    def run_torch():
        h = hf(pixel_values=xs, patch_attention_mask=mask).last_hidden_state
        return ref(h, [(32, 32)] * batch)

    flops = batch * (
        encoder_flops(1024, 1152, 4304, 27, 3 * 14 * 14)
        + 2 * 1024 * 1152 * 4096  # kv_proj
        + 2 * 2 * 1024 * 4096 * 4096  # k, v in-projections
        + 4 * 96 * 1024 * 4096  # attention
        + 2 * 96 * 4096 * 4096 * 3  # q in-proj, out_proj, proj
    )
    times = [timed(lambda: mx.eval(run_mlx()), repeats), timed(lambda: mx.eval(run_one_stream()), repeats)]
    check = np.abs(np.array(run_mlx()) - run_torch().numpy()).max()
    return "MiniCPM 448px tile (NaViT+resampler)", batch, *times, timed(run_torch, repeats), flops, check


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    peak = matmul_peak()
    rows = [bench_siglip(args.batch, args.repeats), bench_minicpm_tile(args.batch, args.repeats)]
    peak = max(peak, matmul_peak())  # before and after: a busy machine lowers one of them
    print(f"float32 matmul peak (best of MLX / numpy 3072^2, before and after): {peak:.0f} GFLOP/s")
    print(f"MLX BLAS: {mlx_llama3v._blas.loaded or 'MLX built-in'}; torch threads: {torch.get_num_threads()}")
    head = (
        f"| {'model':38} | batch | MLX img/s | MLX 1-stream img/s | torch img/s | speed-up "
        "| MLX GFLOP/s | % of peak | max abs diff |"
    )
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for name, batch, t_mlx, t_one, t_torch, flops, check in rows:
        print(
            f"| {name:38} | {batch:5} | {batch / t_mlx:9.3f} | {batch / t_one:18.3f} | {batch / t_torch:11.3f} "
            f"| {t_torch / t_mlx:7.2f}x | {flops / t_mlx / 1e9:11.0f} | {100 * flops / t_mlx / 1e9 / peak:8.0f}% "
            f"| {check:12.2e} |"
        )


if __name__ == "__main__":
    main()
