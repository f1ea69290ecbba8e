"""Faults a disk or a damaged file causes (issue 15 items 3 and 4): every writer gives one
``error:`` line and exit 2 and leaves no temporary file; a damaged model or adapter file is
one error naming it; ``convert`` records checksums that ``load(verify=True)`` checks.

Unwritable outputs are real: a path under a regular file, ``/proc``, and (where user
namespaces allow it) a read-only and a tiny full tmpfs mounted with ``unshare -rm``.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_llama3v.convert.cli import app as convert_app
from mlx_llama3v.errors import DamagedFileError, OutputError
from mlx_llama3v.files import CHECKSUMS, check_safetensors, write_atomic, write_json
from mlx_llama3v.fuse import app as fuse_app
from mlx_llama3v.generation.generate import app as generate_app
from mlx_llama3v.loading import load
from test_fuse import make_adapters

REPO = Path(__file__).resolve().parents[1]


def invoke(app, args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


def assert_one_error(app, args, *fragments):
    code, err, out = invoke(app, args)
    assert code == 2, (code, err, out)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def leftovers(folder: Path):
    """Hidden temporary files or folders (``.name.partial-PID``, ``.name.tmp-PID``)."""
    return sorted(p.name for p in Path(folder).rglob(".*") if ".partial-" in p.name or ".tmp-" in p.name)


# ------------------------------------------------------------------ unwritable outputs
def test_outputs_under_a_regular_file(tiny_setup, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    src = tiny_setup.ckpt.path
    assert_one_error(
        convert_app, ["--hf-path", src, "--mlx-path", blocker / "out", "--dtype", "float32"],
        f"{blocker / 'out'}: cannot write the output", f"{blocker} is a file, not a folder",
    )
    adapters = make_adapters(tiny_setup.model, tmp_path / "adapters")
    assert_one_error(
        fuse_app, ["-m", tiny_setup.model, "--adapter-path", adapters, "--save-path", blocker / "fused"],
        f"{blocker / 'fused'}: cannot write the output",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "adapters"]
    assert blocker.read_text() == "not a folder"


def test_outputs_under_proc(tiny_setup):
    assert_one_error(
        convert_app, ["--hf-path", tiny_setup.ckpt.path, "--mlx-path", "/proc/mlx-llama3v-out"],
        "/proc/mlx-llama3v-out: cannot write the output",
    )


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    with pytest.raises(OutputError, match=r"under-a-file: cannot write the output \(.*state.json is a file"):
        write_atomic(tmp_path / "state.json" / "under-a-file", b"x")
    assert json.loads(target.read_text()) == {"step": 1} and leftovers(tmp_path) == []


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    proc = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return proc.returncode == 0


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="no user/mount namespaces here (unshare -rm)")


def in_tmpfs(mount: Path, options: str, command: str, tmp_path: Path, read_only=False):
    """Run ``command`` (a shell line) with a fresh tmpfs mounted at ``mount`` (holding an
    empty ``sub`` folder; remounted read-only if asked), then list the tmpfs."""
    mount.mkdir(parents=True, exist_ok=True)
    remount = f"mount -o remount,ro {mount} && " if read_only else ""
    script = (
        f"mount -t tmpfs -o {options} tmpfs {mount} && mkdir -p {mount}/sub && {remount}"
        f"{command}; echo \"rc=$?\"; ls -A {mount} {mount}/sub"
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    return subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600, env=env,
        cwd=tmp_path,
    )


@needs_unshare
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_convert_and_fuse_on_a_full_or_read_only_disk(tiny_setup, tmp_path, fault):
    mount = tmp_path / "disk"
    options = "size=64k" if fault == "full" else "size=1m"
    py = sys.executable
    adapters = make_adapters(tiny_setup.model, tmp_path / "adapters")
    commands = [
        f"{py} -m mlx_llama3v.convert --hf-path {tiny_setup.ckpt.path} --mlx-path {mount}/sub/out --dtype float32",
        f"{py} -m mlx_llama3v.fuse -m {tiny_setup.model} --adapter-path {adapters} --save-path {mount}/sub/fused",
    ]
    for command, name in zip(commands, ["out", "fused"]):
        proc = in_tmpfs(mount, options, command, tmp_path, read_only=fault == "read-only")
        err = proc.stderr.strip()
        assert "rc=2" in proc.stdout, (proc.stdout, err)
        assert err.startswith(f"error: {mount}/sub/{name}: cannot write the output") and "\n" not in err, err
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert err.endswith(f"({reason})"), err
        listing = proc.stdout.split("rc=2", 1)[1].split()
        assert listing == [f"{mount}:", "sub", f"{mount}/sub:"], proc.stdout  # nothing left behind


@needs_unshare
def test_train_on_a_full_disk_leaves_no_temporary_checkpoint(tiny_setup, tmp_path):
    mount = tmp_path / "disk"
    command = (
        f"{sys.executable} -m mlx_llama3v.train --model {tiny_setup.model} --data {tiny_setup.data} "
        f"--out {mount}/sub/run --stage pretrain --iters 2 --batch-size 2 --save-every 1 --no-progress"
    )
    proc = in_tmpfs(mount, "size=24k", command, tmp_path)
    err = proc.stderr.strip().splitlines()[-1]
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    assert err.startswith(f"error: {mount}/sub/run") and "cannot write the output" in err, proc.stderr
    assert "Traceback" not in proc.stderr
    assert ".tmp-" not in proc.stdout and ".partial-" not in proc.stdout, proc.stdout


# ------------------------------------------------------------------ damaged files
def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zero-bytes":
        path.write_bytes(b"")
    elif how == "broken-header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
    elif how == "huge-header-length":
        path.write_bytes((1 << 40).to_bytes(8, "little") + data[8:])


DAMAGE = ["truncated", "zero-bytes", "broken-header", "huge-header-length"]


@pytest.fixture
def model_copy(tiny_setup, tmp_path):
    return Path(shutil.copytree(tiny_setup.model, tmp_path / "model"))


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_model_file_is_one_error_naming_it(model_copy, how):
    weights = model_copy / "model.safetensors"
    damage(weights, how)
    with pytest.raises(DamagedFileError, match=str(weights)):
        load(model_copy)
    err = assert_one_error(generate_app, ["--model", model_copy, "--prompt", "Hi"], str(weights))
    assert "safetensors" in err


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("file", ["adapters.safetensors", "adapter_config.json"])
def test_a_damaged_adapter_file_is_one_error_naming_it(tiny_setup, tmp_path, how, file):
    folder = make_adapters(tiny_setup.model, tmp_path / "adapters")
    damage(folder / file, how)
    args = ["--model", tiny_setup.model, "--adapter-path", folder, "--prompt", "Hi"]
    assert_one_error(generate_app, args, str(folder / file))
    assert_one_error(
        fuse_app, ["-m", tiny_setup.model, "--adapter-path", folder, "--save-path", tmp_path / "fused"],
        str(folder / file),
    )
    assert not (tmp_path / "fused").exists() and leftovers(tmp_path) == []


def test_convert_records_checksums_that_load_can_verify(model_copy):
    recorded = json.loads((model_copy / CHECKSUMS).read_text())["sha256"]
    assert sorted(recorded) == ["model.safetensors"] and len(recorded["model.safetensors"]) == 64
    load(model_copy, verify=True)  # intact
    weights = model_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the data: the header still reads
    weights.write_bytes(bytes(data))
    check_safetensors(weights)
    load(model_copy)  # undetectable without the checksums
    with pytest.raises(DamagedFileError, match=r"model.safetensors: checksum mismatch"):
        load(model_copy, verify=True)
    (model_copy / CHECKSUMS).unlink()
    with pytest.raises(Exception, match="no checksums.json"):
        load(model_copy, verify=True)


# ------------------------------------------------------------------ embed and train
def test_embed_and_train_outputs_under_a_regular_file(tiny_setup, tmp_path):
    from mlx_llama3v.embed.cli import app as embed_app
    from mlx_llama3v.train.cli import app as train_app

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    images = tiny_setup.images[0].parent
    assert_one_error(
        embed_app, ["--model", tiny_setup.model, "--images", images, "--out", blocker / "cache"],
        f"{blocker / 'cache'}: cannot write the output ({blocker} is a file, not a folder)",
    )
    assert_one_error(
        train_app,
        ["--model", tiny_setup.model, "--data", tiny_setup.data, "--out", blocker / "run",
         "--stage", "pretrain", "--iters", "1", "--batch-size", "1", "--no-progress"],
        f"{blocker / 'run'}: cannot write the output ({blocker} is a file, not a folder)",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_embed_strict_leaves_no_empty_cache(tiny_setup, tmp_path):
    from mlx_llama3v.embed.cli import app as embed_app

    images = tmp_path / "images"
    images.mkdir()
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "cache"
    assert_one_error(
        embed_app, ["--model", tiny_setup.model, "--images", images, "--out", out, "--strict"],
        "broken.png", "(--strict)",
    )
    assert not out.exists()


def test_features_from_another_model_are_one_settings_error(tiny_setup, tmp_path):
    from hf_checkpoints import make_minicpm
    from mlx_llama3v.convert import convert
    from mlx_llama3v.embed import embed
    from mlx_llama3v.train.cli import app as train_app

    other = make_minicpm(tmp_path / "other-hf", seed=1)  # same shapes, other weights
    other_model = convert(str(other.path), tmp_path / "other", dtype="float32")
    embed(str(other_model), str(tiny_setup.images[0].parent), str(tmp_path / "feats"))
    out = tmp_path / "run"
    err = assert_one_error(
        train_app,
        ["--model", tiny_setup.model, "--data", tiny_setup.data, "--features", tmp_path / "feats",
         "--out", out, "--stage", "pretrain", "--iters", "1", "--batch-size", "1", "--no-progress"],
        f"{tmp_path / 'feats'}: the feature cache was made with other settings than",
        "vision_fingerprint",
    )
    assert "skipped" not in err and not (out / "checkpoints").exists()
