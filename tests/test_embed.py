"""``mlx_llama3v.embed``: the feature cache, end to end on tiny converted models.

The features read back must equal a direct forward pass of the vision tower (within
the stored dtype's precision); duplicates are stored once; slice and patch grids are
recorded; a command killed with SIGKILL (inside a shard write) resumes into the very
shards, byte for byte, that an uninterrupted run makes; ``--verify`` names a corrupted shard; two ranks under
``mlx.launch`` (ring backend, localhost) make the same cache as one.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from hf_checkpoints import make_bunny, make_minicpm
from mlx_llama3v.convert import convert
from mlx_llama3v.embed import CacheError, FeatureCache, embed, stack_features, verify
from mlx_llama3v.embed.cli import app
from mlx_llama3v.embed.sources import SourceError, list_images
from mlx_llama3v.loading import load
from mlx_llama3v.models.vision import make_tile_batch
from mlx_llama3v.processing import preprocess_image

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT = 120


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny converted models: bunny (fixed 24 px tiles, layer -2 features) and MiniCPM
    (NaViT tower, sliced images of varying tile sizes)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, make in (("bunny", make_bunny), ("minicpm", make_minicpm)):
        ckpt = make(root / f"hf-{name}")
        out[name] = convert(str(ckpt.path), root / name, dtype="float32")
    return out


def write_images(folder: Path, count: int, seed: int = 0, sizes=((40, 28), (20, 20), (33, 50))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """9 distinct images in two subfolders, one byte-identical copy, one corrupt file."""
    folder = tmp_path_factory.mktemp("photos")
    paths = write_images(folder, 9)
    shutil.copy(paths[1], folder / "copy-of-1.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder, paths


def direct_features(model_path, image):
    """The tower's features for each tile of ``image``, one image per forward pass."""
    model, processor = load(model_path)
    processed = preprocess_image(image, processor.config)
    batch = make_tile_batch(processed.tiles, model.vision_tower.config)
    feats = model.vision_tower(batch)
    return [np.array(f[:n]) for f, n in zip(feats, batch.lengths)], processed


def stored_tensor_names(cache_dir: Path):
    names = []
    for shard in sorted((cache_dir / "shards").glob("*.safetensors")):
        with safe_open(str(shard), "numpy") as f:
            names += list(f.keys())
    return names


def cache_content(cache_dir: Path) -> dict:
    """key -> (slice grid, patch grids, [float32 tile features])."""
    with FeatureCache(cache_dir, dtype=mx.float32) as cache:
        return {
            k: (item.grid, item.patch_grids, [np.array(t) for t in item.tiles])
            for k in sorted(cache.keys())
            for item in [cache[k]]
        }


def assert_same_content(a: dict, b: dict, tol: float):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key][:2] == b[key][:2], key
        for x, y in zip(a[key][2], b[key][2]):
            assert x.shape == y.shape
            assert np.abs(x - y).max() <= tol * np.abs(y).max(), key


# ------------------------------------------------------------------ parity
# max |stored - direct| allowed, relative to max |direct|: float32 only sees batching
# order; float16 rounds to 2^-11 and bfloat16 to 2^-8 of each value
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}


@pytest.mark.parametrize(
    "family,dtype",
    [("minicpm", "float32"), ("minicpm", "float16"), ("bunny", "bfloat16"), ("bunny", "int8")],
)
def test_cached_features_equal_a_direct_forward_pass(models, photos, tmp_path, family, dtype):
    folder, paths = photos
    summary = embed(models[family], folder, tmp_path / "cache", dtype=dtype, batch_size=3)
    assert summary.encoded == 9 and summary.failed == 1 and summary.duplicates == 1
    cache = FeatureCache(tmp_path / "cache")
    assert cache.stored_dtype == dtype and len(cache) == 9
    worst = 0.0
    for path in paths:
        ref, processed = direct_features(models[family], path)
        item = cache[path]
        assert len(item.tiles) == len(ref) == len(processed.tiles)
        for got, want in zip(item.tiles, ref):
            got = np.array(got.astype(mx.float32))
            assert got.shape == want.shape
            err = np.abs(got - want)
            if dtype == "int8":  # per row: half a quantization step of that row's absmax
                step = np.abs(want).max(axis=1, keepdims=True) / 127
                assert np.all(err <= 0.5 * step * (1 + 1e-3) + 1e-7)
            else:
                assert err.max() <= TOLERANCE[dtype] * np.abs(want).max()
            worst = max(worst, err.max() / np.abs(want).max())
    # the comparison can fail: another image's features are far off
    other = direct_features(models[family], paths[3])[0][0]  # same size as paths[0]
    assert np.abs(np.array(cache[paths[0]].tiles[0].astype(mx.float32)) - other).max() > 0.05
    # the reported error is the measured one
    report = json.loads((tmp_path / "cache" / "report.json").read_text())
    error = report["cache"]["error_vs_float32"]
    if dtype == "float32":
        assert error["relative_max"] == 0
    else:
        assert 0 < error["relative_max"] <= worst * 1.001 + 1e-9
        assert 0 < error["relative_rms"] < error["relative_max"] * 10


def test_slice_grids_and_patch_grids_are_recorded(models, photos, tmp_path):
    folder, paths = photos
    embed(models["minicpm"], folder, tmp_path / "cache", batch_size=4, dtype="float32")
    cache = FeatureCache(tmp_path / "cache")
    model, processor = load(models["minicpm"])
    sliced = 0
    for path in paths:
        processed = preprocess_image(path, processor.config)
        item = cache[path]
        assert item.grid == processed.grid
        assert item.patch_grids == [(t.shape[0] // 4, t.shape[1] // 4) for t in processed.tiles]
        assert [t.shape[0] for t in item.tiles] == [r * c for r, c in item.patch_grids]
        sliced += processed.grid is not None
    assert sliced >= 3, "the test images should include sliced ones"
    # the cached features drive the projector exactly like the tiles do
    items = [cache[p] for p in paths[:3]]
    feats, batch = stack_features(items)
    projected = model.project(feats, batch)
    tiles = [t for p in paths[:3] for t in preprocess_image(p, processor.config).tiles]
    direct = model.encode_images(tiles)
    assert len(projected) == len(direct)
    for a, b in zip(projected, direct):
        assert np.abs(np.array(a) - np.array(b)).max() <= 1e-4 * np.abs(np.array(b)).max()


def test_duplicates_are_stored_once(models, photos, tmp_path):
    folder, paths = photos
    listing = tmp_path / "list.jsonl"
    records = [{"image": str(p.relative_to(folder))} for p in paths[:4]]
    records += [
        {"image": "copy-of-1.jpg"},
        {"image": [str(paths[2].relative_to(folder))]},
        {"text": "no image"},
    ]
    listing.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    summary = embed(models["bunny"], listing, tmp_path / "cache", image_root=folder)
    assert (summary.listed, summary.unique, summary.duplicates, summary.encoded) == (5, 4, 1, 4)
    names = stored_tensor_names(tmp_path / "cache")
    keys = [n.split(".")[0] for n in names]
    assert len(names) == len(set(names)) == 4  # one tile each, no duplicate tensors
    digest = hashlib.sha256(paths[1].read_bytes()).hexdigest()
    assert keys.count(digest) == 1
    cache = FeatureCache(tmp_path / "cache")
    assert np.array_equal(
        np.array(cache[folder / "copy-of-1.jpg"].tiles[0]), np.array(cache[paths[1]].tiles[0])
    )
    # a second run over the whole folder encodes only what is new
    again = embed(models["bunny"], folder, tmp_path / "cache")
    assert (again.cached, again.encoded, again.failed) == (4, 5, 1)
    assert len(FeatureCache(tmp_path / "cache")) == 9


def test_lookup_by_path_bytes_or_key(models, photos, tmp_path):
    folder, paths = photos
    embed(models["bunny"], folder, tmp_path / "cache")
    cache = FeatureCache(tmp_path / "cache")
    data = paths[3].read_bytes()
    key = hashlib.sha256(data).hexdigest()
    by_path, by_bytes, by_key = cache[paths[3]], cache[data], cache[key]
    assert by_path.key == by_bytes.key == by_key.key == key
    assert np.array_equal(np.array(by_path.tiles[0]), np.array(by_key.tiles[0]))
    assert key in cache and str(paths[3]) in cache and b"other bytes" not in cache
    with pytest.raises(KeyError):
        cache[b"other bytes"]
    with pytest.raises(KeyError):
        cache[folder / "broken.jpg"]
    with pytest.raises(CacheError, match="not a feature cache"):
        FeatureCache(tmp_path)


def test_int8_halves_the_size(models, photos, tmp_path):
    folder, _ = photos
    sizes = {}
    for dtype in ("float32", "float16", "int8"):
        s = embed(models["bunny"], folder, tmp_path / dtype, dtype=dtype)
        sizes[dtype] = sum(
            f.stat().st_size for f in (tmp_path / dtype / "shards").glob("*.safetensors")
        )
        assert s.bytes_per_image == pytest.approx(s.cache_bytes / 9)
    # tiny tiles: 36 rows x 32 values, so the per-row scale weighs 4/32 here (4/1152 at full size)
    assert sizes["float16"] / sizes["float32"] < 0.6
    assert sizes["int8"] / sizes["float16"] < 0.7


# ------------------------------------------------------------------ sources
def test_sources(tmp_path):
    imgs = write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    assert list_images(tmp_path / "imgs") == sorted(imgs)
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"# comment\n\n{imgs[1].relative_to(tmp_path)}\n{imgs[0]}\n{imgs[1].relative_to(tmp_path)}\n"
    )
    assert list_images(listing) == [imgs[1], imgs[0]]
    llava = tmp_path / "data" / "llava.json"
    llava.parent.mkdir()
    llava.write_text(
        json.dumps(
            [
                {"id": 1, "image": "b/img000.png", "conversations": []},
                {"id": 2, "conversations": []},
                {"id": 3, "image": ["a/img001.jpg", "b/img000.png"]},
            ]
        )
    )
    assert list_images(llava, image_root=tmp_path / "imgs") == [imgs[0], imgs[1]]
    assert list_images(llava) == [llava.parent / "b/img000.png", llava.parent / "a/img001.jpg"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.jpg"}\n{"image": \n')
    with pytest.raises(SourceError, match="line 2"):
        list_images(bad)
    with pytest.raises(SourceError, match="not found"):
        list_images(tmp_path / "missing")


def test_tiles_are_batched_by_shape():
    from mlx_llama3v.embed.pipeline import TileBatcher

    batcher = TileBatcher(batch_size=3, max_tiles=6)
    shapes = [(8, 8, 3)] * 4 + [(8, 12, 3)] * 2 + [(12, 8, 3)] * 2 + [(4, 4, 3)]
    batches = []
    for i, shape in enumerate(shapes):
        batcher.add(object(), [np.full(shape, i, np.float32)])
        batches += [[r.pixels.shape for r in b] for b in batcher.ready()]
    assert batches[0] == [(8, 8, 3)] * 3, "a full batch of equal tiles goes first"
    assert all(len(b) == 3 for b in batches) and batcher.waiting <= 6
    batches += [[r.pixels.shape for r in b] for b in batcher.drain()]
    assert sorted(s for b in batches for s in b) == sorted(shapes) and batcher.waiting == 0
    assert all(len(b) == 3 for b in batches), "leftovers fill whole batches"


# ------------------------------------------------------------------ bad input, skipped images
def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr.strip()


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def test_unreadable_images_are_skipped_and_listed(models, photos, tmp_path):
    folder, paths = photos
    listing = tmp_path / "list.txt"
    listing.write_text(
        f"{paths[0]}\n{folder / 'broken.jpg'}\n{tmp_path / 'gone.jpg'}\n{paths[1]}\n"
    )
    code, out, err = cli("--model", models["bunny"], "--images", listing, "--out", tmp_path / "c")
    assert code == 0, err
    assert "2 skipped" in out and "report.json" in out
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["encoded"] == 2 and report["skipped"] == 2
    skipped = {s["path"]: s["error"] for s in report["skipped_images"]}
    assert "not a recognised image" in skipped[str(folder / "broken.jpg")]
    assert "file not found" in skipped[str(tmp_path / "gone.jpg")]


def test_strict_makes_unreadable_images_fatal(models, photos, tmp_path):
    folder, paths = photos
    listing = tmp_path / "list.txt"
    listing.write_text(f"{paths[0]}\n{paths[1]}\n{folder / 'broken.jpg'}\n{paths[2]}\n")
    code, _, err = cli(
        "--model", models["bunny"], "--images", listing, "--out", tmp_path / "c", "--strict"
    )
    assert_one_line_error(code, err, "broken.jpg", "not a recognised image", "--strict")
    assert len(FeatureCache(tmp_path / "c")) == 2, "images encoded before the failure are kept"
    listing.write_text(f"{paths[0]}\n{tmp_path / 'gone.jpg'}\n")
    code, _, err = cli(
        "--model", models["bunny"], "--images", listing, "--out", tmp_path / "d", "--strict"
    )
    assert_one_line_error(code, err, "gone.jpg", "file not found")


def test_bad_command_line_input(models, photos, tmp_path):
    folder, _ = photos
    out = ["--out", tmp_path / "c"]
    assert_one_line_error(
        *cli("--model", tmp_path / "nope", "--images", folder, *out)[::2], "model", "not found"
    )
    assert_one_line_error(
        *cli("--model", models["bunny"], "--images", tmp_path / "nope", *out)[::2],
        "image source",
        "not found",
    )
    assert_one_line_error(*cli("--images", folder, *out)[::2], "--model is required")
    assert_one_line_error(
        *cli("--model", models["bunny"], "--images", folder)[::2], "--out is required"
    )
    assert_one_line_error(
        *cli("--model", models["bunny"], "--images", folder, *out, "--dtype", "int4")[::2],
        "dtype must be one of",
    )
    code, _, err = cli("--model", models["bunny"], "--images", folder, *out)
    assert code == 0, err
    assert_one_line_error(
        *cli("--model", models["bunny"], "--images", folder, *out, "--dtype", "float32")[::2],
        "other settings",
        "dtype",
    )
    assert_one_line_error(
        *cli("--model", models["minicpm"], "--images", folder, *out)[::2], "other settings"
    )
    assert_one_line_error(
        *cli("--model", models["bunny"], "--images", folder, "--out", folder)[::2],
        "is not empty and holds no feature cache",
    )
    assert {p.name for p in folder.iterdir()} == {"a", "b", "copy-of-1.jpg", "broken.jpg"}


def test_missing_model_from_the_real_command_line(photos, tmp_path):
    folder, _ = photos
    cmd = [
        sys.executable,
        "-m",
        "mlx_llama3v.embed",
        "--model",
        str(tmp_path / "none"),
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "c"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: model {tmp_path / 'none'} not found"


# ------------------------------------------------------------------ verify
def test_verify_names_a_corrupted_shard(models, photos, tmp_path):
    folder, _ = photos
    cache_dir = tmp_path / "c"
    embed(models["bunny"], folder, cache_dir, shard_size_mb=0.004)  # about 2 images a shard
    code, out, err = cli("--verify", "--out", cache_dir)
    shards = sorted((cache_dir / "shards").glob("*.safetensors"))
    assert code == 0 and f"{len(shards)} shards OK" in out and len(shards) >= 3
    victim = shards[1]
    data = bytearray(victim.read_bytes())
    data[len(data) - 7] ^= 0x01  # one bit of one feature value
    victim.write_bytes(bytes(data))
    code, out, err = cli("--verify", "--out", cache_dir)
    assert code == 1
    assert out.splitlines() == [f"BAD {victim.name}: checksum mismatch"]
    assert "1 bad file" in err
    shards[2].unlink()
    checked, bad = verify(cache_dir)
    assert checked == len(shards) and dict(bad) == {
        victim.name: "checksum mismatch",
        shards[2].name: "missing",
    }


# ------------------------------------------------------------------ interruption
def start_embed(args, delay: float):
    hook = str(Path(__file__).with_name("run_with_hook.py"))
    cmd = [sys.executable, hook, "embed-delay", str(delay), "mlx_llama3v.embed", *map(str, args), "--no-progress"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def committed(cache_dir: Path) -> int:
    try:
        return len(json.loads((cache_dir / "index.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return 0


def temp_files(cache_dir: Path, pattern: str = ".*.tmp-*"):
    folder = cache_dir / "shards"
    return list(folder.glob(pattern)) if folder.exists() else []


def kill_mid_shard(args, cache_dir: Path, at_least: int, delay: float = 0.15):
    """SIGKILL the command while it is inside a shard write, after ``at_least`` commits."""
    proc = start_embed(args, delay)
    deadline = time.monotonic() + CLI_TIMEOUT
    try:
        while time.monotonic() < deadline:
            # the test hook pauses half way through writing a shard's temporary file
            if committed(cache_dir) >= at_least and temp_files(cache_dir, ".*.safetensors.tmp-*"):
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
                return
            if proc.poll() is not None:
                raise AssertionError(f"embed exited early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        raise AssertionError("the command never reached the kill point")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_run_resumes_into_the_same_cache(models, tmp_path):
    folder = tmp_path / "imgs"
    write_images(folder, 30, seed=3, sizes=((30, 20), (18, 26)))
    reference = tmp_path / "reference"
    embed(models["bunny"], folder, reference, batch_size=2, shard_size_mb=0.001)
    cache_dir = tmp_path / "resumed"
    args = [
        "--model",
        models["bunny"],
        "--images",
        folder,
        "--out",
        cache_dir,
        "--batch-size",
        "2",
        "--shard-size",
        "0.001",
    ]  # one image a shard
    kill_mid_shard(args, cache_dir, at_least=3)
    first = committed(cache_dir)
    assert 3 <= first < 30 and temp_files(cache_dir), "killed inside a shard write"
    checked, bad = verify(cache_dir)
    assert checked == first and bad == [], "the index names only complete shards"
    kill_mid_shard(args, cache_dir, at_least=first + 3)
    second = committed(cache_dir)
    assert first + 3 <= second < 30
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_llama3v.embed", *map(str, args), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"{30 - second} images" in proc.stdout and f"{second} already cached" in proc.stdout
    assert not temp_files(cache_dir)
    names = stored_tensor_names(cache_dir)
    assert len(names) == len(set(names)) == 30, "no duplicates, none missing"
    assert {p.stem for p in (cache_dir / "shards").glob("*.safetensors")} == {
        Path(r["name"]).stem for r in json.loads((cache_dir / "index.json").read_text())["shards"]
    }, "no stray shard files"
    assert verify(cache_dir) == (30, [])
    assert_same_content(cache_content(cache_dir), cache_content(reference), tol=1e-3)
    digests = lambda d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
                         for p in (d / "shards").glob("*.safetensors")}
    assert digests(cache_dir) == digests(reference), "killed twice, yet byte-identical shards"


# ------------------------------------------------------------------ distributed
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher():
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def test_two_ranks_with_mlx_launch_make_the_same_cache(models, photos, tmp_path):
    folder, _ = photos
    single = tmp_path / "single"
    embed(models["minicpm"], folder, single, batch_size=2)
    two = tmp_path / "two"
    port = free_port()
    cmd = [
        *launcher(),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(port),
        "--",
        sys.executable,
        "-m",
        "mlx_llama3v.embed",
        "--model",
        str(models["minicpm"]),
        "--images",
        str(folder),
        "--out",
        str(two),
        "--batch-size",
        "2",
        "--no-progress",
    ]
    # stdin: an open pipe, so the launcher's input relay waits instead of spinning
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"mlx.launch timed out: {err[-2000:]}") from None
    # the launcher exits 0 even when a rank fails: check what the ranks wrote
    assert "over 2 ranks" in out, (out, err)
    index = json.loads((two / "index.json").read_text())
    ranks = {r["name"][:4] for r in index["shards"]}
    assert ranks == {"r000", "r001"}, "both ranks encoded a share"
    assert not list(two.glob("index.rank*.json")) and not list(two.glob("report.rank*.json"))
    report = json.loads((two / "report.json").read_text())
    assert (report["ranks"], report["encoded"], report["skipped"]) == (2, 9, 1)
    assert stored_tensor_names(two).__len__() == len(stored_tensor_names(single))
    assert verify(two)[1] == []
    assert_same_content(cache_content(two), cache_content(single), tol=1e-3)
