"""Resumable training checkpoints, written atomically.

``OUT/checkpoints/step-0000040/`` holds everything needed to continue exactly:

- the trained weights in the output format (``adapters.safetensors`` +
  ``adapter_config.json`` and/or ``projector.safetensors``, see ``tuning``), so a
  checkpoint folder is also a usable adapter folder;
- ``optimizer.safetensors``: the optimizer state (AdamW moments, its step counter);
- ``state.json``: the optimizer step, the data position (micro-batches consumed, from
  which the epoch and the batch within it follow), the seed and the MLX random key,
  and a fingerprint of the settings that must not change on resume;
- ``checksums.json``: the SHA-256 of every other file, so damage (a truncation, a
  flipped byte) is found before a resume uses the checkpoint.

``--resume`` validates a checkpoint before using it (checksums; state.json parses and
agrees with the folder's name, the optimizer's step and the micro-batch count; the
trained weights and the optimizer state are readable, complete, of the model's shapes
and finite). A damaged checkpoint is reported on stderr and the next older one tried;
damaged folders are left as they are (the resumed run overwrites them as it reaches
their step). When none is usable, resuming stops with one error naming each problem.

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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path

from ..files import fsync_path, sha256_file, write_atomic, writing
from .tuning import ADAPTERS, PROJECTOR
from ..errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
CHECKSUMS = "checksums.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


class ResumeError(UserError, ValueError):
    """The checkpoint cannot continue this run; the message is one line."""


class DamagedCheckpoint(Exception):
    """A checkpoint that must not be resumed from; the message says what is wrong."""


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
            mx.save_safetensors(str(tmp / OPTIMIZER), dict(tree_flatten(optimizer.state)))
            (tmp / STATE).write_text(json.dumps(asdict(state), indent=2), encoding="utf-8")
            sums = {f.name: sha256_file(f) for f in sorted(tmp.iterdir())}
            (tmp / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=2), encoding="utf-8")
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


def candidates(out: Path) -> List[Path]:
    """Checkpoint folders to resume from, best first: the one ``latest`` names, then
    the others from the newest step down."""
    root = Path(out) / CHECKPOINTS
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / LATEST
    try:
        named = root / pointer.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        named = None
    if named in found:
        found.remove(named)
        found.insert(0, named)
    return found


def resume_checkpoint(
    out: Path, model, optimizer, fingerprint: str, micro_per_step: int, log: Callable[[str], None]
) -> Optional[Tuple[Path, TrainState]]:
    """Restore the newest good checkpoint of ``out``; None when it holds none at all.

    Damaged checkpoints are reported through ``log`` and skipped; ResumeError when
    there are checkpoints but none is usable, or one was made with other settings.
    """
    found = candidates(out)
    if not found:
        return None
    problems = []
    for path in found:
        try:
            state, weights, saved = read_checkpoint(path, model, optimizer, fingerprint, micro_per_step)
        except DamagedCheckpoint as e:
            problems.append(f"{path.name}: {e}")
            log(f"warning: checkpoint {path} is damaged ({e}); trying an older one")
            continue
        model.load_weights(list(weights.items()), strict=False)
        optimizer.state = saved
        mx.eval(model.parameters(), optimizer.state)
        if problems:
            log(f"warning: resuming from {path}, the newest good checkpoint")
        return path, state
    raise ResumeError(
        f"no usable checkpoint in {Path(out) / CHECKPOINTS} ({'; '.join(problems)}); "
        "remove the folder to start again"
    )


def read_checkpoint(path: Path, model, optimizer, fingerprint: str, micro_per_step: int = 0):
    """(state, trained weights, optimizer state) of a checkpoint, every part checked.

    Raises DamagedCheckpoint for damage, ResumeError for a checkpoint of other
    settings. Nothing of the model or optimizer is changed (the optimizer is
    initialised for the model's trainable parameters, as resuming needs anyway).
    """
    path = Path(path)
    _check_sums(path)
    state = _read_state(path, micro_per_step)
    if state.fingerprint != fingerprint:
        raise ResumeError(
            f"{path} was made with other settings ({state.fingerprint} != {fingerprint}); "
            "resume with the same options, or start a new output folder"
        )
    expected = dict(tree_flatten(model.trainable_parameters()))
    weights = {}
    for name, prefix in ((ADAPTERS, "language_model."), (PROJECTOR, "projector.")):
        if (path / name).exists():
            weights.update({prefix + k: v for k, v in _read_tensors(path / name).items()})
    missing = [k for k in expected if k not in weights]
    if missing:
        raise DamagedCheckpoint(
            f"its trained weights lack {missing[0]}"
            + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    _check_shapes(weights, expected, "trained weight")
    optimizer.init(model.trainable_parameters())
    target = dict(tree_flatten(optimizer.state))
    saved = _read_tensors(path / OPTIMIZER)
    lacking = [k for k in target if k not in saved]
    if lacking:
        raise DamagedCheckpoint(f"the optimizer state lacks {lacking[0]}")
    _check_shapes(saved, target, "optimizer tensor")
    if "step" in saved and int(saved["step"].item()) != state.step:
        raise DamagedCheckpoint(
            f"the optimizer is at step {int(saved['step'].item())}, state.json at {state.step}"
        )
    return state, weights, tree_map_with_path(lambda k, _: saved[k], optimizer.state)


def _check_sums(path: Path) -> None:
    """Every file against checksums.json (checkpoints written before it had none)."""
    if not (path / CHECKSUMS).exists():
        return
    try:
        sums = json.loads((path / CHECKSUMS).read_text(encoding="utf-8"))["sha256"]
        if not isinstance(sums, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise DamagedCheckpoint(f"{CHECKSUMS} is not valid JSON") from None
    for name, digest in sums.items():
        if not (path / str(name)).is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if sha256_file(path / str(name)) != digest:
            raise DamagedCheckpoint(f"{name} does not match its checksum")


def _read_state(path: Path, micro_per_step: int) -> TrainState:
    try:
        data = json.loads((path / STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{STATE} is missing") from None
    except (OSError, ValueError):
        raise DamagedCheckpoint(f"{STATE} is not valid JSON") from None
    names = {f.name for f in fields(TrainState)}
    if not isinstance(data, dict) or set(data) != names:
        raise DamagedCheckpoint(f"{STATE} does not hold a training state")
    state = TrainState(**data)
    ints = (state.step, state.micro_batches, state.seed)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints):
        raise DamagedCheckpoint(f"{STATE} holds a step, micro-batch count or seed that is not a count")
    if path.name != f"step-{state.step:07d}":
        raise DamagedCheckpoint(f"{STATE} says step {state.step}, the folder is {path.name}")
    if micro_per_step and state.micro_batches != state.step * micro_per_step:
        raise DamagedCheckpoint(
            f"{STATE} counts {state.micro_batches} micro-batches for {state.step} steps of "
            f"{micro_per_step}"
        )
    return state


def _read_tensors(path: Path) -> Dict[str, mx.array]:
    """A safetensors file, checked whole and finite before it is used."""
    from ..convert.common import ConvertError, safetensors_keys

    if not path.exists():
        raise DamagedCheckpoint(f"{path.name} is missing")
    try:
        safetensors_keys(path)
        tensors = mx.load(str(path))
    except ConvertError as e:
        raise DamagedCheckpoint(str(e).replace(str(path), path.name)) from None
    except Exception as e:  # MLX's loader raises several types
        raise DamagedCheckpoint(f"{path.name} cannot be read ({' '.join(str(e).split())})") from None
    for k, v in tensors.items():
        if mx.issubdtype(v.dtype, mx.floating) and not bool(mx.isfinite(v).all()):
            raise DamagedCheckpoint(f"{path.name}: {k} holds NaN or infinite values")
    return tensors


def _check_shapes(found: Dict[str, mx.array], expected: Dict[str, mx.array], what: str) -> None:
    for k, v in expected.items():
        if tuple(found[k].shape) != tuple(v.shape):
            raise DamagedCheckpoint(
                f"{what} {k} has shape {tuple(found[k].shape)}, the model needs {tuple(v.shape)}"
            )


def _prune(root: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".step-*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid():
            shutil.rmtree(tmp, ignore_errors=True)


