"""The data path at the recipe's size: per-item cost and peak memory as N grows.

With the tests' tiny MiniCPM-Llama3-V (a 2-layer tower, 16 x 16 px images: one tile
each), so that the fixed costs per image and per record show instead of the matrix
products, at N = 1K, 10K and 100K distinct images and records:

- ``embed`` end to end (listing, hashing, decoding, tower, shard writing, lookup), and
  a rerun over the finished cache (what resuming costs per image already done);
- opening the cache + 10K random lookups by image path (path map + features);
- training's data preparation (read, tokenize with the tile layouts from the cache,
  length-bucket) from a LLaVA JSON array and from JSONL, with the peak RSS per sample
  beyond the token ids;
- steps/s of stage-1 training from the cache (batch 8);

plus opening a cache of 1M synthetic entries and 10K random lookups in it.

Each row runs in a child process, so its peak RSS (VmHWM) is its own. Goals (issue 16):
per-item cost at 100K within 1.25x of 1K on every row; the 1M cache opens in under 2 s
and answers 10K lookups in under 1 s; data preparation below 2 KB per sample beyond the
token ids. Other processes may share the machine: the load average is printed.

Run: ``python benchmarks/scale.py [--sizes 1000,10000,100000] [--million]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))
sys.path.insert(0, str(REPO))


def vm(field: str) -> int:
    """VmRSS / VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


# ------------------------------------------------------------------ setup
def make_model(root: Path) -> Path:
    from hf_checkpoints import make_minicpm
    from mlx_llama3v.convert import convert

    if not (root / "mlx" / "config.json").exists():
        convert(hf_path=str(make_minicpm(root / "hf").path), mlx_path=root / "mlx", dtype="float32")
    return root / "mlx"


def make_data(root: Path, n: int) -> None:
    """n distinct 16 x 16 PNG images in folders of 1000, and the same n records as a
    LLaVA JSON array and as JSONL (LLaVA-Pretrain's shape: one image, a caption)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    lines = []
    for i in range(n):
        path = root / "images" / f"{i // 1000:04d}" / f"{i:07d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        rec = {
            "id": f"{i:07d}",
            "image": str(path.relative_to(root)),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in this image?"},
                {"from": "gpt", "value": "A photo number %d of %s." % (i, "a cat" * (1 + i % 4))},
            ],
        }
        lines.append(json.dumps(rec))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "data.json").write_text("[\n" + ",\n".join(lines) + "\n]\n")


# ------------------------------------------------------------------ rows (children)
def row_embed(root: Path, model: Path, fresh: bool = True) -> dict:
    """A fresh cache (``fresh``), or a rerun over the complete one (what a resumed run
    pays for the images already done: a stat each, no file read)."""
    import shutil

    from mlx_llama3v.embed import embed

    if fresh and (root / "cache").exists():
        shutil.rmtree(root / "cache")
    reset_peak()
    t = time.perf_counter()
    summary = embed(str(model), str(root / "data.jsonl"), str(root / "cache"), dtype="float16",
                    batch_size=32, shard_size_mb=64)
    seconds = time.perf_counter() - t
    assert summary.encoded + summary.cached == summary.unique, summary
    return {"seconds": seconds, "items": summary.unique, "peak_rss": vm("VmHWM")}


def row_lookup(root: Path, model: Path) -> dict:
    from mlx_llama3v.embed import FeatureCache

    paths = sorted((root / "images").rglob("*.png"))
    picks = random.Random(0).choices(paths, k=10_000)
    reset_peak()
    t = time.perf_counter()
    cache = FeatureCache(root / "cache")
    opened = time.perf_counter() - t
    for p in picks:
        cache[p]
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "open_seconds": opened, "items": len(picks), "peak_rss": vm("VmHWM")}


def row_prepare(root: Path, model: Path, fmt: str) -> dict:
    from mlx_llama3v.embed import FeatureCache
    from mlx_llama3v.loading import load
    from mlx_llama3v.train.batching import BatchPlan
    from mlx_llama3v.train.data import SampleEncoder, load_samples
    from mlx_llama3v.train.features import cache_layout

    model_, processor = load(str(model))
    cache = FeatureCache(root / "cache")
    enc = SampleEncoder(processor.tokenizer, processor.config, model_.config.projector_config, 512,
                  layout=cache_layout(cache, processor.config))
    import gc

    gc.collect()
    base = vm("VmRSS")
    reset_peak()
    t = time.perf_counter()
    samples, report = load_samples([root / f"data.{fmt}"], enc, log=lambda s: None)
    plan = BatchPlan({s.index: s.length for s in samples}, 8, seed=0)
    plan.epoch(0)
    seconds = time.perf_counter() - t
    ids = sum(s.ids.nbytes for s in samples)
    peak = vm("VmHWM")
    return {"seconds": seconds, "items": report.kept, "peak_rss": peak,
            "bytes_per_sample": (peak - base) / report.kept,
            "beyond_ids": (peak - base - ids) / report.kept}


def row_train(root: Path, model: Path) -> dict:
    from mlx_llama3v.train import LoopArgs, TrainConfig, TuneConfig, train

    out = root / "train-out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cfg = TrainConfig(model=str(model), data=[str(root / "data.jsonl")], out=str(out),
                      features=str(root / "cache"), max_length=512,
                      tune=TuneConfig(stage="pretrain"),
                      loop=LoopArgs(iters=30, batch_size=8, learning_rate=1e-3, progress=False,
                                    steps_per_save=1000))
    reset_peak()
    train(cfg, log=lambda s: None)
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    secs = sorted(e["step_seconds"] for e in steps if "step_seconds" in e)[5:]  # after warm-up
    mean = sum(secs) / len(secs)
    return {"seconds": mean, "items": 1, "steps_per_s": 1 / mean, "peak_rss": vm("VmHWM")}


def row_million(root: Path, model: Path) -> dict:
    from mlx_llama3v.embed import FeatureCache
    from synthetic_cache import synthetic_key, write_synthetic_cache

    folder = root / "million"
    if not (folder / "index.json").exists():
        write_synthetic_cache(folder, 1_000_000, per_shard=50_000)
    picks = [synthetic_key(i) for i in random.Random(0).sample(range(1_000_000), 10_000)]
    reset_peak()
    t = time.perf_counter()
    cache = FeatureCache(folder)
    opened = time.perf_counter() - t
    t = time.perf_counter()
    for k in picks:
        cache[k]
    return {"seconds": time.perf_counter() - t, "open_seconds": opened, "items": len(picks),
            "entries": len(cache), "peak_rss": vm("VmHWM")}


ROWS = {
    "embed": row_embed,
    "embed-rerun": lambda r, m: row_embed(r, m, fresh=False),
    "lookup": row_lookup,
    "prepare-json": lambda r, m: row_prepare(r, m, "json"),
    "prepare-jsonl": lambda r, m: row_prepare(r, m, "jsonl"),
    "train": row_train,
    "million": row_million,
}


def child(row: str, root: Path, model: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", row, "--root", str(root), "--model", str(model)],
        capture_output=True, text=True, cwd=REPO,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{row} at {root}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--million", action="store_true", help="also the 1M synthetic cache")
    ap.add_argument("--work", default=None, help="folder for the data (default: a temp folder)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--root", default=None)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(ROWS[args.child](Path(args.root), Path(args.model))))
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    model = make_model(work / "model")
    results = {}
    for n in [int(x) for x in args.sizes.split(",")]:
        root = work / f"n{n}"
        root.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        make_data(root, n)
        print(f"N={n}: data written in {time.perf_counter() - t:.1f} s; load {os.getloadavg()}",
              file=sys.stderr)
        for row in ("embed", "embed-rerun", "lookup", "prepare-json", "prepare-jsonl", "train"):
            results[(row, n)] = child(row, root, model)
            print(f"  {row}: {results[(row, n)]}", file=sys.stderr)
    if args.million:
        results[("million", 1_000_000)] = child("million", work, model)
    report(results)


def report(results: dict) -> None:
    sizes = sorted({n for (row, n) in results if row != "million"})
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    head = "| row | " + " | ".join(f"N={n:,}" for n in sizes) + " | 100K/1K |"
    print(head)
    print("|" + "---|" * (len(sizes) + 2))
    units = {"embed": ("ms/image", 1e3), "embed-rerun": ("ms/image, all cached", 1e3), "lookup": ("us/lookup (open + 10K)", 1e6),
             "prepare-json": ("ms/record, JSON array", 1e3),
             "prepare-jsonl": ("ms/record, JSONL", 1e3), "train": ("ms/step (batch 8)", 1e3)}
    for row, (unit, scale) in units.items():
        cells = []
        per = {}
        for n in sizes:
            r = results[(row, n)]
            per[n] = r["seconds"] / r["items"]
            cells.append(f"{per[n] * scale:.3f}, {r['peak_rss'] / 1e6:.0f} MB")
        ratio = per[sizes[-1]] / per[sizes[0]] if len(sizes) > 1 else float("nan")
        print(f"| {row} ({unit}, peak RSS) | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    for fmt in ("json", "jsonl"):
        cells = [f"{results[(f'prepare-{fmt}', n)]['bytes_per_sample']:.0f} B "
                 f"({results[(f'prepare-{fmt}', n)]['beyond_ids']:.0f} beyond ids)" for n in sizes]
        print(f"| prepare-{fmt} RSS per sample | " + " | ".join(cells) + " | |")
    cells = [f"{results[('train', n)]['steps_per_s']:.1f}" for n in sizes]
    print("| train steps/s | " + " | ".join(cells) + " | |")
    if ("million", 1_000_000) in results:
        r = results[("million", 1_000_000)]
        print(f"\n1M synthetic entries: open {r['open_seconds']:.3f} s, 10K random lookups "
              f"{r['seconds']:.3f} s, peak RSS {r['peak_rss'] / 1e6:.0f} MB ({r['entries']:,} entries)")


if __name__ == "__main__":
    main()
