"""Feature-cache throughput: the full ``mlx_llama3v.embed`` command vs the bare tower vs transformers.

Setup: JPEG "photos" (smooth gradients, shapes and sensor-like noise, so they decode
like real photos) at 640x480 and 1920x1080, alternating, in a temporary folder; a
SigLIP-so400m-384 tower with random weights (transformers' init, seed 0) saved as a
``SiglipVisionModel`` checkpoint and composed with a tiny Llama into an MLX model
(family siglip_llama3, float32) by ``mlx_llama3v.convert``. The language model is
irrelevant to embedding.

Rows (images/s; every row sees the same images, float32 compute):

- bare tower: ``VisionTower.encode`` on already preprocessed tiles, ``--batch-size``
  tiles per call (the product's forward path: tiles split over one CPU stream per core);
- command: ``python -m mlx_llama3v.embed`` in a subprocess over the folder (listing,
  hashing, decode threads, batching, float16 (``--dtype``) shards with fsync, index). Its rate is
  the one it reports: images / seconds from model loaded to index merged; the wall
  time with start-up and model loading is shown too;
- transformers: a plain loop, ``SiglipImageProcessor`` + ``SiglipVisionModel``, batch 8
  (PIL decoding included, ``torch.inference_mode``, SDPA attention).

Also checks the command's cached features against transformers' (storage error included).
Run: ``python benchmarks/embed.py`` (8 photos, one batch: about 8 minutes on an idle
2-core CPU, where so400m runs at about 0.1 image/s); ``--images 300`` for the
few-hundred-photo run on a faster machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# torch first: its BLAS calls bind to its own library before mlx_llama3v opens
# OpenBLAS globally for MLX (opened earlier, OpenBLAS would serve torch's calls too)
import torch  # noqa: I001

import mlx_llama3v  # noqa: F401  (optimised BLAS for MLX on Linux, before mlx.core)
import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from so400m import SO400M as SO400M_SHAPE  # noqa: E402

SO400M = dict(SO400M_SHAPE, image_size=384)
SIZES = [(640, 480), (1920, 1080)]


def photo(size, seed: int) -> Image.Image:
    """A photo-like picture: a colour gradient, blurred shapes, then pixel noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / w * rng.uniform(0.3, 1) + y / h * rng.uniform(0.3, 1))[..., None] / 2
    img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(0.03, 0.25) * w
        box = [x0 - r, y0 - r * rng.uniform(0.4, 1), x0 + r, y0 + r * rng.uniform(0.4, 1)]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(w / 400))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def make_photos(folder: Path, count: int) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = SIZES[i % 2]
        path = folder / f"photo{i:04d}_{w}x{h}.jpg"
        photo((w, h), i).save(path, quality=90)
        paths.append(path)
    return paths


def make_model(workdir: Path):
    """(torch SiglipVisionModel, MLX model folder) with the same random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from hf_checkpoints import make_llama
    from mlx_llama3v.convert import convert

    torch.manual_seed(0)
    cfg = SiglipVisionConfig(**SO400M)
    cfg._attn_implementation = "sdpa"
    hf = SiglipVisionModel(cfg).eval()
    # written by hand: transformers 5 saves SiglipVisionModel keys without the
    # "vision_model." prefix that hub checkpoints (and the converter) use
    (workdir / "siglip").mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(workdir / "siglip")
    state = {
        k if k.startswith("vision_model.") else f"vision_model.{k}": v.contiguous()
        for k, v in hf.state_dict().items()
    }
    save_file(state, str(workdir / "siglip" / "model.safetensors"), metadata={"format": "pt"})
    make_llama(workdir / "llama")
    out = convert(
        vision=str(workdir / "siglip"),
        llm=str(workdir / "llama"),
        mlx_path=workdir / "mlx",
        dtype="float32",
        force=True,
    )
    shutil.rmtree(workdir / "siglip")
    return hf, out


def bench_bare(model_dir: Path, paths: list, batch: int, repeats: int) -> float:
    from mlx_llama3v.loading import load
    from mlx_llama3v.processing import preprocess_image

    model, processor = load(model_dir)
    tower = model.vision_tower
    tiles = [preprocess_image(p, processor.config).tiles[0] for p in paths[:batch]]
    mx.eval([f for _, _, f in tower.encode(tiles[:2])])  # warm-up (one tile per CPU stream)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval([f for _, _, f in tower.encode(tiles)])
        best = min(best, time.perf_counter() - t)
    del model
    return len(tiles) / best


def bench_command(model_dir: Path, folder: Path, out: Path, batch: int, dtype: str):
    cmd = [
        sys.executable,
        "-m",
        "mlx_llama3v.embed",
        "--model",
        str(model_dir),
        "--images",
        str(folder),
        "--out",
        str(out),
        "--batch-size",
        str(batch),
        "--dtype",
        dtype,
        "--no-progress",
    ]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"the command failed:\n{proc.stderr}")
    rate = float(re.search(r"\(([\d.]+) images/s\)", proc.stdout).group(1))
    encoded = int(re.search(r"encoded (\d+) images", proc.stdout).group(1))
    return rate, encoded / wall, proc.stdout.strip()


@torch.inference_mode()
def bench_transformers(hf, paths: list, batch: int = 8):
    from transformers import SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 384, "width": 384})
    first = hf(**processor(images=[Image.open(paths[0])], return_tensors="pt"))  # warm-up
    feats = {}
    t = time.perf_counter()
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        images = [Image.open(p).convert("RGB") for p in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        out = hf(pixel_values=pixels).last_hidden_state
        if i == 0:
            feats = {p: out[j].numpy() for j, p in enumerate(chunk)}
    del first
    return len(paths) / (time.perf_counter() - t), feats


def compare(cache_dir: Path, reference: dict) -> float:
    from mlx_llama3v.embed import FeatureCache

    cache = FeatureCache(cache_dir, dtype=mx.float32)
    worst = 0.0
    for path, want in reference.items():
        got = np.array(cache[path].tiles[0])
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return worst


def load_avg() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def print_table(args, rows, torch_rate: float, bare: float) -> None:
    print(
        f"machine: {os.cpu_count()} CPU cores, MLX {mx.__version__} on {mx.default_device()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); {args.images} photos, "
        f"SigLIP-so400m-384 float32, batch {args.batch_size}, stored {args.dtype}"
    )
    print()
    print("| path | images/s | vs bare tower | vs transformers | load avg after |")
    print("|---|---|---|---|---|")
    for name, rate, load in rows:
        print(
            f"| {name} | {rate:.3f} | {100 * rate / bare:.0f}% | {rate / torch_rate:.2f}x "
            f"| {load:.1f} |"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="photos to generate and encode")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--dtype", default="float16", help="the command's stored dtype (int8 shows its error)"
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed bare-tower batches (best of)")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="keep files here (default: a temp folder)"
    )
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="embed-bench-"))
    try:
        t = time.perf_counter()
        paths = make_photos(workdir / "photos", args.images)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(
            f"{len(paths)} JPEG photos ({mb:.1f} MB, {' and '.join(f'{w}x{h}' for w, h in SIZES)}) "
            f"in {time.perf_counter() - t:.1f} s; building the so400m model ...",
            flush=True,
        )
        hf, model_dir = make_model(workdir)
        print("timing the bare tower ...", flush=True)
        bare = bench_bare(model_dir, paths, args.batch_size, args.repeats)
        rows = [("bare MLX tower (`VisionTower.encode`, preprocessed tiles)", bare, load_avg())]
        print("timing the command ...", flush=True)
        cache_dir = workdir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        rate, wall_rate, log = bench_command(
            model_dir, workdir / "photos", cache_dir, args.batch_size, args.dtype
        )
        rows += [
            ("`mlx_llama3v.embed` command (model loaded -> index merged)", rate, load_avg()),
            (
                "`mlx_llama3v.embed` command, wall incl. start-up and model load",
                wall_rate,
                load_avg(),
            ),
        ]
        print(log, flush=True)
        print("timing transformers ...", flush=True)
        torch_rate, reference = bench_transformers(hf, paths)
        rows.append(
            (
                "transformers loop (SiglipImageProcessor + SiglipVisionModel, batch 8)",
                torch_rate,
                load_avg(),
            )
        )
        diff = compare(cache_dir, reference)
        report = json.loads((cache_dir / "report.json").read_text())
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(args, rows, torch_rate, bare)
    error = report["cache"]["error_vs_float32"]
    print()
    print(
        f"command: tower busy {100 * report['tower_busy']:.1f}% of its run (the pipeline's own "
        "overhead, whatever else loads the machine)"
    )
    print(
        f"cache: {report['cache']['bytes_per_image'] / 1e6:.2f} MB per image ({args.dtype}, "
        f"729 x 1152 + header); max |cached - transformers| / max |transformers| = {diff:.1e} "
        f"({args.dtype} storage alone: max {error['relative_max']:.1e}, "
        f"relative RMS {error['relative_rms']:.1e})"
    )


if __name__ == "__main__":
    main()
