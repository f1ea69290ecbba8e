"""Resumable training checkpoints, written atomically.

``OUT/checkpoints/step-0000040/`` holds everything needed to continue exactly:

- the trained weights in the output format (``adapters.safetensors`` +
  ``adapter_config.json`` and/or ``projector.safetensors``, see ``tuning``), so a
  checkpoint folder is also a usable adapter folder;
- ``optimizer.safetensors``: the optimizer state (AdamW moments, its step counter);
- ``state.json``: the optimizer step, the data position (micro-batches consumed, from
  which the epoch and the batch within it follow), the seed and the MLX random key,
  and a fingerprint of the settings that must not change on resume.

A checkpoint is written into a hidden temporary folder, fsynced and renamed; then
``checkpoints/latest`` (a one-line file naming it) is replaced atomically. A run
killed at any moment leaves ``latest`` naming a complete checkpoint. The random
state needs no restoring: the trainer reseeds MLX's generator from (seed,
micro-batch) before each micro-batch, so it follows from the data position.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..files import fsync_path, write_atomic, writing
from .tuning import ADAPTERS, PROJECTOR
from ..errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class ResumeError(UserError, ValueError):
    """The checkpoint cannot continue this run; the message is one line."""


@dataclass
class TrainState:
    step: int = 0
    micro_batches: int = 0
    seed: int = 0
    rng_key: Optional[list] = None
    fingerprint: str = ""


def save_checkpoint(
    out: Path, state: TrainState, write_weights: Callable[[Path], object], optimizer, keep: int = 2
) -> Path:
    """Write a checkpoint atomically, point ``latest`` at it, keep the last ``keep``."""
    root = Path(out) / CHECKPOINTS
    name = f"step-{state.step:07d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    final = root / name
    try:
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            state.rng_key = [int(v) for v in mx.random.state[0].tolist()]
            write_weights(tmp)
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
            for f in tmp.iterdir():
                fsync_path(f)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no temporary folder
    write_atomic(root / LATEST, (name + "\n").encode())
    _prune(root, keep, final)
    return final


def latest_checkpoint(out: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    root = Path(out) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.exists():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if (path / "state.json").exists():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, model, optimizer, fingerprint: str) -> TrainState:
    """Restore the trained weights and the optimizer; returns the saved state."""
    path = Path(path)
    state = TrainState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    if state.fingerprint != fingerprint:
        raise ResumeError(
            f"{path} was made with other settings ({state.fingerprint} != {fingerprint}); "
            "resume with the same options, or start a new output folder"
        )
    weights = {}
    if (path / ADAPTERS).exists():
        weights.update({f"language_model.{k}": v for k, v in mx.load(str(path / ADAPTERS)).items()})
    if (path / PROJECTOR).exists():
        weights.update({f"projector.{k}": v for k, v in mx.load(str(path / PROJECTOR)).items()})
    expected = dict(tree_flatten(model.trainable_parameters()))
    if not set(expected) <= set(weights):
        raise ResumeError(f"{path}: its trained weights are not this model's trainable ones")
    model.load_weights(list(weights.items()), strict=False)
    saved = mx.load(str(path / "optimizer.safetensors"))
    optimizer.init(model.trainable_parameters())
    try:
        optimizer.state = tree_map_with_path(lambda k, _: saved[k], optimizer.state)
    except KeyError as e:
        raise ResumeError(f"{path}: the optimizer state lacks {e.args[0]}") from None
    mx.eval(model.parameters(), optimizer.state)
    return state


def _prune(root: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".step-*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            shutil.rmtree(tmp, ignore_errors=True)


