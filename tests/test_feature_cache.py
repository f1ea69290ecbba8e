"""The feature cache at size and under damage: the lookup table, healing reruns,
byte-identical shards whatever the timing and interruptions, training without images."""

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

import mlx_llama3v.embed.cache as cache_mod
import mlx_llama3v.embed.pipeline as pipeline
from mlx_llama3v.embed import CacheError, FeatureCache, embed, verify
from mlx_llama3v.embed.lookup import LOOKUP
from mlx_llama3v.train import train
from mlx_llama3v.train.data import DataError
from mlx_llama3v.train.run import TrainError
from synthetic_cache import synthetic_key, synthetic_tile, write_synthetic_cache
from test_embed import models, write_images  # noqa: F401  (fixture)
from test_train_loop import config
from test_train_support import REPO, TinySetup, llava, read_losses, write_jsonl


def shard_digests(cache_dir: Path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((cache_dir / "shards").glob("*.safetensors"))
    }


def stored_bytes(cache_dir: Path) -> dict:
    """tensor name -> its stored bytes, over every shard."""
    out = {}
    for shard in (cache_dir / "shards").glob("*.safetensors"):
        with safe_open(str(shard), "numpy") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).tobytes()
    return out


# ------------------------------------------------------------------ size
def test_a_cache_of_100k_images_opens_without_reading_its_entries(tmp_path, monkeypatch):
    root = write_synthetic_cache(tmp_path / "c", 100_000, per_shard=25_000)
    read = []
    monkeypatch.setattr(cache_mod, "read_entries", lambda *a: read.append(a) or {})
    cache = FeatureCache(root)
    assert len(cache) == 100_000 and len(cache.shards) == 4
    for i in random.Random(0).sample(range(100_000), 2000):
        item = cache[synthetic_key(i)]
        np.testing.assert_array_equal(np.array(item.tiles[0]), synthetic_tile(i))
        assert item.patch_grids == [(1, 2)]
    assert synthetic_key(100_000) not in cache and synthetic_key(5) in cache
    with pytest.raises(KeyError):
        cache[synthetic_key(100_001)]
    assert read == [], "opening and reading used the lookup table only"
    cache.close()
    monkeypatch.undo()
    # the table is derived data: a lost or garbled one is rebuilt from the entry files
    (root / LOOKUP).write_bytes(b"garbage" * 100)
    cache = FeatureCache(root)
    assert len(cache) == 100_000
    np.testing.assert_array_equal(np.array(cache[synthetic_key(77)].tiles[0]), synthetic_tile(77))


def downgrade_to_first_format(root: Path) -> None:
    """Rewrite the entry files as the first writer did (no crc32, no spans, no stats)."""
    doc = json.loads((root / "index.json").read_text())
    for r in doc["shards"]:
        path = root / "shards" / r["entries"]
        entries = json.loads(path.read_text())
        for e in entries["images"].values():
            e.pop("crc32"), e.pop("spans")
        data = json.dumps(entries, indent=0).encode()
        path.write_bytes(data)
        r.update(entries_sha256=hashlib.sha256(data).hexdigest(), entries_bytes=len(data))
        r.pop("stat")
    (root / "index.json").write_text(json.dumps(doc, indent=1))
    (root / LOOKUP).unlink()


def test_caches_of_the_first_format_are_read_and_checked(models, tmp_path):  # noqa: F811
    folder = tmp_path / "imgs"
    write_images(folder, 6)
    embed(models["bunny"], folder, tmp_path / "new", dtype="float32", shard_size_mb=0.004)
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    downgrade_to_first_format(tmp_path / "old")
    new, old = FeatureCache(tmp_path / "new"), FeatureCache(tmp_path / "old")
    assert sorted(new.keys()) == sorted(old.keys())
    for path in sorted(folder.rglob("*.*")):
        np.testing.assert_array_equal(np.array(new[path].tiles[0]), np.array(old[path].tiles[0]))
    # no per-image checksums there: the shard's sha256 is checked when it is first opened
    victim = sorted((tmp_path / "old" / "shards").glob("*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10
    victim.write_bytes(bytes(data))
    old = FeatureCache(tmp_path / "old")
    key = next(k for k in old.keys() if old.lookup.find(k)[0] == victim.name)
    with pytest.raises(CacheError, match=f"shard {victim.name} is damaged: checksum mismatch"):
        old[key]


# ------------------------------------------------------------------ healing
def flip(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def run_embed(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_llama3v.embed", *map(str, args), "--no-progress"],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )


def test_a_rerun_heals_missing_and_damaged_shards(models, tmp_path):  # noqa: F811
    folder = tmp_path / "imgs"
    write_images(folder, 10, sizes=((30, 20), (18, 26)))
    args = ["--model", models["bunny"], "--images", folder, "--shard-size", "0.001"]  # 1 image a shard
    assert run_embed(*args, "--out", tmp_path / "ref").returncode == 0
    cache_dir = tmp_path / "hurt"
    shutil.copytree(tmp_path / "ref", cache_dir)
    shards = sorted((cache_dir / "shards").glob("*.safetensors"))
    flip(shards[1])  # same size, one bit of a feature value
    reader = FeatureCache(cache_dir)
    key = json.loads(shards[1].with_suffix(".json").read_text())["images"].popitem()[0]
    with pytest.raises(CacheError, match=f"shard {shards[1].name} is damaged: .*checksum"):
        reader[key]
    reader[json.loads(shards[2].with_suffix(".json").read_text())["images"].popitem()[0]]  # fine
    shards[0].unlink()  # a lost shard
    shards[3].with_suffix(".json").unlink()  # its entries lost
    shards[4].write_bytes(shards[4].read_bytes()[:100])  # truncated
    flip(shards[5].with_suffix(".json"), at=20)  # damaged entries
    assert len(verify(cache_dir)[1]) == 5
    proc = run_embed(*args, "--out", cache_dir)
    assert proc.returncode == 0, proc.stderr
    assert "5 already cached" in proc.stdout and "5 to encode" in proc.stdout, proc.stdout
    for s in (shards[0], shards[1], shards[3], shards[4], shards[5]):
        assert f"shard {s.name} was damaged" in proc.stdout
    assert verify(cache_dir) == (10, [])
    assert stored_bytes(cache_dir) == stored_bytes(tmp_path / "ref"), "re-encoded bit for bit"
    again = run_embed(*args, "--out", cache_dir)
    assert "10 already cached" in again.stdout and "damaged" not in again.stdout


def test_a_rerun_after_an_edit_reads_only_the_changed_shard(models, tmp_path, monkeypatch):  # noqa: F811
    folder = tmp_path / "imgs"
    write_images(folder, 4)
    embed(models["bunny"], folder, tmp_path / "c", shard_size_mb=0.001)
    checked = []
    real = cache_mod._check_file
    monkeypatch.setattr(cache_mod, "_check_file", lambda p, *a: checked.append(p.name) or real(p, *a))
    embed(models["bunny"], folder, tmp_path / "c", shard_size_mb=0.001)
    assert checked == [], "unchanged shards are trusted by size and mtime"
    shard = sorted((tmp_path / "c" / "shards").glob("*.safetensors"))[2]
    flip(shard)
    summary = embed(models["bunny"], folder, tmp_path / "c", shard_size_mb=0.001)
    assert checked == [shard.name] and summary.encoded == 1


# ------------------------------------------------------------------ determinism
def test_shards_are_byte_identical_whatever_the_timing_and_interruptions(models, tmp_path, monkeypatch):  # noqa: F811
    folder = tmp_path / "imgs"
    write_images(folder, 14, seed=5)  # MiniCPM slices these into tiles of several shapes
    opts = dict(batch_size=3, dtype="float16", shard_size_mb=0.01)
    embed(models["minicpm"], folder, tmp_path / "ref", workers=1, **opts)
    reference = shard_digests(tmp_path / "ref")
    assert len(reference) >= 3

    real_prepare = pipeline.prepare
    rng = random.Random(1)

    def slow_prepare(item, cfg):  # decode threads finish in random order
        import time

        time.sleep(rng.random() * 0.02)
        return real_prepare(item, cfg)

    monkeypatch.setattr(pipeline, "prepare", slow_prepare)
    real_flush = cache_mod.ShardWriter.flush
    interrupted = []
    for stop_after in (1, 1, None):  # killed twice after one more shard, then to the end
        commits = [0]

        def flush(self, commits=commits, stop_after=stop_after):
            if stop_after is not None and commits[0] == stop_after and self.buffer:
                raise RuntimeError("interrupted")
            commits[0] += bool(self.buffer)
            real_flush(self)

        monkeypatch.setattr(cache_mod.ShardWriter, "flush", flush)
        try:
            embed(models["minicpm"], folder, tmp_path / "run", workers=4, **opts)
        except RuntimeError:
            assert stop_after is not None
            interrupted.append(len(shard_digests(tmp_path / "run")))
    assert interrupted == [1, 2], "killed after one shard, then after one more"
    assert shard_digests(tmp_path / "run") == reference
    index = lambda p: [(r["name"], r["sha256"]) for r in json.loads((p / "index.json").read_text())["shards"]]  # noqa: E731
    assert index(tmp_path / "run") == index(tmp_path / "ref")


# ------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinySetup(tmp_path_factory.mktemp("feature-cache"))


def pictures_and_data(tiny, tmp_path):
    shutil.copytree(tiny.root / "img", tmp_path / "pics")
    data = write_jsonl(tmp_path / "train.jsonl", [llava(i, image=f"pics/{i % 6}.png") for i in range(8)])
    return tmp_path / "pics", data


def cached_config(tiny, tmp_path, data, name, features=None, **loop):
    cfg = config(tiny, tmp_path / name, "pretrain", **loop)
    cfg.data, cfg.features = [str(data)], features and str(features)
    return cfg


def test_training_from_the_cache_opens_no_image_file(tiny, tmp_path, monkeypatch):
    import mlx_llama3v.train.data as data_mod
    import mlx_llama3v.train.features as features_mod

    pics, data = pictures_and_data(tiny, tmp_path)
    embed(str(tiny.model), str(data), str(tmp_path / "cache"), dtype="float32")
    live = train(cached_config(tiny, tmp_path, data, "live"), log=lambda s: None)
    shutil.rmtree(pics)

    def no_images(*a, **k):
        raise AssertionError("an image was opened")

    monkeypatch.setattr(data_mod, "load_image", no_images)
    monkeypatch.setattr(features_mod, "preprocess_image", no_images)
    cached = train(cached_config(tiny, tmp_path, data, "cached", tmp_path / "cache"), log=lambda s: None)
    assert cached.train_report.kept == 8
    a, b = read_losses(live.out), read_losses(cached.out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)


def test_a_damaged_cache_stops_training_naming_the_shard(tiny, tmp_path):
    pics, data = pictures_and_data(tiny, tmp_path)
    cache_dir = tmp_path / "cache"
    embed(str(tiny.model), str(data), str(cache_dir), dtype="float32", shard_size_mb=0.001)
    shards = sorted((cache_dir / "shards").glob("*.safetensors"))
    flip(shards[2])
    with pytest.raises(DataError, match=f"shard {shards[2].name} is damaged: .*checksum"):
        train(cached_config(tiny, tmp_path, data, "a", cache_dir, iters=8), log=lambda s: None)
    shards[3].unlink()
    with pytest.raises(TrainError, match=f"shard {shards[3].name} is damaged: missing"):
        train(cached_config(tiny, tmp_path, data, "b", cache_dir), log=lambda s: None)
    assert not (tmp_path / "b" / "metrics.jsonl").exists() or not read_losses(tmp_path / "b")
    cfg = cached_config(tiny, tmp_path, data, "c", cache_dir)
    cfg.model = str(tiny.model)
    # another model's preprocessing: one settings error, not one line per sample
    index = json.loads((cache_dir / "index.json").read_text())
    index["settings"]["preprocessing"]["image_size"] = 999
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(TrainError, match=r"other settings than .*\(preprocessing differ\)"):
        train(cfg, log=lambda s: None)


def test_embed_lists_images_of_every_training_format(tmp_path):
    from mlx_llama3v.embed.sources import SourceError, list_images

    imgs = write_images(tmp_path / "imgs", 3)
    rel = [str(p.relative_to(tmp_path)) for p in imgs]
    minicpm = tmp_path / "minicpm.json"
    minicpm.write_text(json.dumps([
        {"id": "0", "image": rel[0], "conversations": []},
        {"id": "1", "image": {"<image_00>": rel[1], "<image_01>": rel[2]}, "conversations": []},
    ], indent=2))
    assert list_images(minicpm) == imgs
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"image": r, "conversations": []} for r in reversed(rel)])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert list_images(tmp_path / "d.parquet") == imgs[::-1]
    assert list_images(tmp_path / "saved", image_root=tmp_path) == imgs[::-1]
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"image": "a.png"},\n{"image": oops}]')
    with pytest.raises(SourceError, match="line 3"):
        list_images(bad)


def test_a_dataset_with_images_inside_embeds_and_trains_from_the_cache(tiny, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {
            "image": {"bytes": (tiny.root / f"img/{i % 6}.png").read_bytes(), "path": None},
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in this image?"},
                {"from": "gpt", "value": f"Answer {i}."},
            ],
        }
        for i in range(8)
    ]
    features = datasets.Features({
        "image": datasets.Image(),
        "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
    })
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    summary = embed(str(tiny.model), str(tmp_path / "ds"), str(tmp_path / "cache"), dtype="float32")
    assert (summary.listed, summary.unique, summary.encoded) == (8, 6, 6)
    assert verify(tmp_path / "cache") == (1, [])
    live = train(cached_config(tiny, tmp_path, tmp_path / "ds", "live"), log=lambda s: None)
    cached = train(cached_config(tiny, tmp_path, tmp_path / "ds", "cached", tmp_path / "cache"),
                   log=lambda s: None)
    a, b = read_losses(live.out), read_losses(cached.out)
    np.testing.assert_allclose([b[s] for s in sorted(a)], [a[s] for s in sorted(a)], rtol=1e-4)


def test_a_rerun_reads_no_image_file_already_done(models, tmp_path, monkeypatch):  # noqa: F811
    import os

    import mlx_llama3v.embed.runner as runner

    folder = tmp_path / "imgs"
    paths = write_images(folder, 6)
    embed(models["bunny"], folder, tmp_path / "c")
    hashed = []
    real = runner._hash_file
    monkeypatch.setattr(runner, "_hash_file", lambda p: hashed.append(p.name) or real(p))
    again = embed(models["bunny"], folder, tmp_path / "c")
    assert (again.cached, again.encoded, hashed) == (6, 0, []), "keys from the path map"
    st = paths[2].stat()
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    again = embed(models["bunny"], folder, tmp_path / "c")
    assert (again.cached, again.encoded, hashed) == (6, 0, [paths[2].name])
