"""Files, in one place: JSON, safetensors headers, checksums and crash-safe writes.

- ``write_atomic``: write to a hidden temporary name, fsync, rename over the target;
  a process killed at any moment leaves the old file or the new one, never half of
  one, and a write that fails (full disk, read-only file system, a path under a
  regular file) removes its temporary file and raises ``OutputError`` naming the path.
- ``writing(path)``: the same ``OutputError`` for any block that writes under ``path``
  (mlx's own writers report a failed write as a ``RuntimeError``).
- ``check_safetensors``: a safetensors file's header, after checking the file is whole,
  else ``DamagedFileError`` naming it.
- ``write_checksums`` / ``verify_checksums``: sha256 of a folder's weight files in
  ``checksums.json`` (written by ``convert`` and ``fuse``; ``load(verify=True)`` checks).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

from .errors import DamagedFileError, OutputError, UserError, one_line

CHECKSUMS = "checksums.json"


# ------------------------------------------------------------------ writing
def fsync_path(path: Path) -> None:
    """fsync a file, or a folder to make renames inside it durable (a no-op where a
    folder cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden sibling name, unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def output_error(path, error: BaseException) -> OutputError:
    """One line saying why ``path`` cannot be written."""
    blocker = _file_above(Path(path))
    if blocker is not None:
        reason = f"{blocker} is a file, not a folder"
    elif isinstance(error, OSError) and error.strerror:
        reason = error.strerror
    else:  # mlx's writers say "[write] Unable to write N bytes": find out why
        reason = _disk_state(Path(path)) or one_line(error)
    return OutputError(path, reason)


def check_writable(path) -> None:
    """Fail early (before slow work) when ``path`` cannot be created or written:
    a file where a folder should be, a read-only file system, no permission."""
    given, path = path, Path(path).absolute()
    blocker = _file_above(path)
    if blocker is not None:
        raise OutputError(given, f"{blocker} is a file, not a folder")
    folder = next((p for p in [path, *path.parents] if p.is_dir()), None)
    if folder is None:
        return
    state = _disk_state(folder)
    if state == os.strerror(errno.EROFS) or not os.access(folder, os.W_OK):
        raise OutputError(given, state or os.strerror(errno.EACCES))


def _file_above(path: Path) -> Optional[Path]:
    """The regular file standing where a folder above ``path`` should be, if any."""
    for parent in path.parents:
        if parent.exists():
            return parent if not parent.is_dir() else None
    return None


def _disk_state(path: Path) -> Optional[str]:
    """"Read-only file system" / "No space left on device" for the disk under ``path``."""
    folder = next((p for p in [path, *path.parents] if p.is_dir()), None)
    try:
        stat = os.statvfs(folder)
    except (OSError, TypeError):
        return None
    if stat.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if stat.f_bavail * stat.f_frsize < (1 << 20):
        return os.strerror(errno.ENOSPC)
    return None


def _write_failure(error: BaseException) -> bool:
    if isinstance(error, OutputError):
        return False
    if isinstance(error, OSError):
        return True
    # mlx's save_safetensors / save report failed writes as RuntimeError
    text = str(error)
    return isinstance(error, RuntimeError) and ("write" in text or "open file" in text)


@contextmanager
def writing(path) -> Iterator[None]:
    """Turn a failed write inside the block into ``OutputError`` naming ``path``."""
    try:
        yield
    except OutputError as e:  # from a write inside: name what the caller writes
        raise OutputError(path, e.reason) from None
    except (OSError, RuntimeError) as e:
        if not _write_failure(e):
            raise
        raise output_error(path, e) from None


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """Delete the temporary file ``tmp`` if the block fails (or is interrupted)."""
    try:
        yield
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write, fsync, rename over ``path``, fsync the folder; ``OutputError`` if it cannot."""
    path = Path(path)
    tmp = temp_name(path)
    with removed_on_failure(tmp), writing(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    fsync_path(path.parent)


# ------------------------------------------------------------------ JSON
def read_json(path: Path, error: type = UserError):
    """A JSON file; a missing or broken one raises ``error`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: not valid JSON ({one_line(e)})") from None


def write_json(path: Path, data, indent: int = 2) -> None:
    """A JSON file, written atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n"
    write_atomic(Path(path), text.encode("utf-8"))


# ------------------------------------------------------------------ safetensors
def safetensors_header(buf) -> tuple:
    """(header, offset of the data) of a safetensors file held in ``buf`` (bytes or mmap)."""
    if len(buf) < 8:
        raise DamagedFileError(f"truncated safetensors file ({len(buf)} bytes, no header)")
    (n,) = struct.unpack("<Q", buf[:8])
    if 8 + n > len(buf):
        raise DamagedFileError("truncated safetensors file (header cut short)")
    try:
        header = json.loads(bytes(buf[8 : 8 + n]))
    except ValueError:
        raise DamagedFileError("corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise DamagedFileError("corrupt safetensors header")
    return header, 8 + n


def check_safetensors(path: Path) -> dict:
    """The header of a safetensors file that is whole: ``DamagedFileError`` naming it if not."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            header, offset = safetensors_header(head + f.read(min(n, size)))
    except DamagedFileError as e:
        raise DamagedFileError(f"{path}: {e}") from None
    except OSError as e:
        raise DamagedFileError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError):
        raise DamagedFileError(f"{path}: corrupt safetensors header") from None
    needed = offset + max(ends, default=0)
    if needed > size:
        raise DamagedFileError(
            f"{path}: truncated safetensors file ({size} bytes, the header needs {needed})"
        )
    return header


# ------------------------------------------------------------------ checksums
def sha256_file(path: Path, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def write_checksums(folder: Path, names: Iterable[str]) -> None:
    """``checksums.json``: the sha256 of each named file in ``folder``."""
    folder = Path(folder)
    write_json(folder / CHECKSUMS, {"sha256": {n: sha256_file(folder / n) for n in sorted(names)}})


def verify_checksums(folder: Path, names: Optional[Iterable[str]] = None) -> None:
    """Check files against ``checksums.json``: ``DamagedFileError`` naming the first that differs."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        raise UserError(f"{folder}: no {CHECKSUMS} to verify against (convert it again to record one)")
    recorded = read_json(folder / CHECKSUMS, DamagedFileError).get("sha256", {})
    for name in sorted(names if names is not None else recorded):
        if name not in recorded:
            raise DamagedFileError(f"{folder / name}: not listed in {CHECKSUMS}")
        if sha256_file(folder / name) != recorded[name]:
            raise DamagedFileError(f"{folder / name}: checksum mismatch (the file is damaged)")
