"""``train --resume`` on damaged checkpoints: real damage on disk (truncation, flipped
bytes, broken JSON, NaN in the optimizer state). The newest good checkpoint is used
(said on stderr) and the run ends as an undamaged one does; with none good, one
``error:`` line, exit 2 and nothing on disk changed."""

import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from mlx_llama3v.train.checkpoint import CHECKPOINTS, CHECKSUMS, candidates
from mlx_llama3v.train.cli import app
from test_train_support import TinySetup


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return TinySetup(tmp_path_factory.mktemp("train-resume"))


def args(tiny, out):
    return [
        "-m",
        str(tiny.model),
        "-d",
        str(tiny.data),
        "--iters",
        "6",
        "-b",
        "4",
        "--lr",
        "1e-3",
        "--save-every",
        "2",
        "--keep-checkpoints",
        "3",
        "--no-progress",
        "-o",
        str(out),
    ]


def cli(*argv):
    result = CliRunner().invoke(app, [str(a) for a in argv])
    return result.exit_code, result.stderr


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A complete run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("run") / "out"
    code, err = cli(*args(tiny, out))
    assert code == 0, err
    assert [p.name for p in candidates(out)] == ["step-0000006", "step-0000004", "step-0000002"]
    return out


def tree_digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path: Path):
    data = bytearray(path.read_bytes())
    for i in (len(data) - 5, len(data) - 37):  # inside the last tensor's data
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def break_json(path: Path):
    path.write_text(path.read_text()[:-7])


def nan_in_optimizer(path: Path):
    state = dict(mx.load(str(path)))
    key = next(k for k, v in sorted(state.items()) if v.ndim == 2)
    v = np.array(state[key])
    v.flat[3] = np.nan
    state[key] = mx.array(v)
    mx.save_safetensors(str(path), state)


DAMAGE = {
    "truncated-adapters": ("adapters.safetensors", truncate, "truncated safetensors file"),
    "flipped-bytes": ("adapters.safetensors", flip_bytes, None),
    "broken-state-json": ("state.json", break_json, "state.json is not valid JSON"),
    "nan-in-optimizer": ("optimizer.safetensors", nan_in_optimizer, "holds NaN or infinite values"),
    "broken-checksums": (CHECKSUMS, break_json, None),
}


# flipped bytes inside tensor data only the checksums can see; the rest is also found
# without them (checkpoints written before checksums.json existed)
CASES = [(d, c) for d in DAMAGE for c in (True, False) if c or DAMAGE[d][2]]


@pytest.mark.parametrize(
    "damage,checksums",
    CASES,
    ids=[f"{d}-{'checksummed' if c else 'no-checksums'}" for d, c in CASES],
)
def test_damaged_latest_checkpoint_falls_back_to_the_newest_good_one(
    tiny, finished, tmp_path, damage, checksums
):
    name, harm, message = DAMAGE[damage]
    out = Path(shutil.copytree(finished, tmp_path / "out"))
    latest = out / CHECKPOINTS / "step-0000006"
    if not checksums:  # as a checkpoint written before checksums.json existed
        for step in (2, 4, 6):
            (out / CHECKPOINTS / f"step-{step:07d}" / CHECKSUMS).unlink()
    harm(latest / name)
    before = tree_digest(out / CHECKPOINTS / "step-0000004")
    code, err = cli(*args(tiny, out), "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    expected = message or f"{name} does not match its checksum"
    if checksums:
        expected = (
            f"{CHECKSUMS} is not valid JSON"
            if name == CHECKSUMS
            else f"{name} does not match its checksum"
        )
    warned = [
        line
        for line in err.splitlines()
        if line.startswith(f"warning: checkpoint {latest} is damaged (")
    ]
    assert len(warned) == 1 and name in warned[0] and expected in warned[0], err
    assert (
        f"warning: resuming from {out / CHECKPOINTS / 'step-0000004'}, the newest good checkpoint"
        in err
    )
    # the run continued from step 4 and ended exactly as the undamaged run did
    a = mx.load(str(finished / "adapters.safetensors"))
    b = mx.load(str(out / "adapters.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    assert tree_digest(out / CHECKPOINTS / "step-0000004") == before
    assert tree_digest(latest) == tree_digest(finished / CHECKPOINTS / "step-0000006"), (
        "step 6 rewritten whole"
    )


def test_no_good_checkpoint_stops_with_one_error_and_changes_nothing(tiny, finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "out"))
    root = out / CHECKPOINTS
    truncate(root / "step-0000006" / "adapters.safetensors")
    break_json(root / "step-0000004" / "state.json")
    for step in (2, 4, 6):
        (root / f"step-{step:07d}" / CHECKSUMS).unlink()
    nan_in_optimizer(root / "step-0000002" / "optimizer.safetensors")
    before = tree_digest(out)
    code, err = cli(*args(tiny, out), "--resume")
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    lines = [line for line in lines if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: no usable checkpoint in {root} (step-0000006: ")
    for fragment in ("truncated safetensors file", "state.json is not valid JSON", "holds NaN"):
        assert fragment in lines[0], lines[0]
    assert tree_digest(out) == before


def test_inconsistent_state_and_missing_files_are_damage(tiny, finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "out"))
    root = out / CHECKPOINTS
    for step in (2, 4, 6):
        (root / f"step-{step:07d}" / CHECKSUMS).unlink()
    state = json.loads((root / "step-0000006" / "state.json").read_text())
    (root / "step-0000006" / "state.json").write_text(json.dumps(dict(state, step=5)))
    state = json.loads((root / "step-0000004" / "state.json").read_text())
    (root / "step-0000004" / "state.json").write_text(json.dumps(dict(state, micro_batches=3)))
    (root / "step-0000002" / "optimizer.safetensors").unlink()
    code, err = cli(*args(tiny, out), "--resume")
    assert code == 2, err
    assert "state.json says step 5, the folder is step-0000006" in err
    assert "state.json counts 3 micro-batches for 4 steps of 1" in err
    assert "optimizer.safetensors is missing" in err


def test_a_checkpoint_of_other_settings_is_still_refused(tiny, finished, tmp_path):
    out = Path(shutil.copytree(finished, tmp_path / "out"))
    code, err = cli(*[a if a != "1e-3" else "5e-4" for a in args(tiny, out)], "--resume")
    assert code == 2 and "other settings" in err and "damaged" not in err, err
