"""How features are stored: float16 / bfloat16 / float32, or int8 with per-row scales.

``int8`` keeps, for every feature row (one patch of one tile), ``scale = max|x| / 127``
(float32) and ``q = round(x / scale)`` (int8): 1 byte per value plus 4 per row, about
half of float16. Every encoded batch also measures what storing cost: the squared
error and the largest absolute error of the stored values against the tower's own
output, so the cache can report its reconstruction error whatever the dtype.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Tuple

import mlx.core as mx
import numpy as np

DTYPES = ("float16", "bfloat16", "float32", "int8")
# safetensors dtype tags, and the numpy type each is written from / read into
# (numpy has no bfloat16: its raw 16 bits travel as uint16)
TAGS = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "int8": "I8"}
NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32, "I8": np.int8}
MLX = {"F16": mx.float16, "BF16": mx.bfloat16, "F32": mx.float32, "I8": mx.int8}
BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "int8": 1}


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def bytes_per_tile(tokens: int, width: int, dtype: str) -> int:
    """Stored bytes of one tile's features (without the file's header); the embed
    pipeline cuts shards with it before the tiles are encoded."""
    scales = 4 * tokens if dtype == "int8" else 0
    return tokens * width * BYTES[dtype] + scales


def store(x: mx.array, dtype: str) -> Tuple[mx.array, Optional[mx.array]]:
    """(values, scales): ``x`` (..., D) in the storage type; scales only for int8."""
    x = x.astype(mx.float32)
    if dtype != "int8":
        return x.astype(getattr(mx, dtype)), None
    scale = mx.max(mx.abs(x), axis=-1, keepdims=True) / 127.0
    scale = mx.where(scale > 0, scale, mx.ones_like(scale))
    q = mx.clip(mx.round(x / scale), -127, 127).astype(mx.int8)
    return q, scale


def restore(values: mx.array, scales: Optional[mx.array], dtype=None) -> mx.array:
    """Stored values back to features: int8 times its scales (float32); others as stored."""
    if scales is not None:
        out = values.astype(mx.float32) * scales.astype(mx.float32)
    else:
        out = values
    return out if dtype is None else out.astype(dtype)


@dataclass
class ErrorStats:
    """Accumulated error of stored features against the tower's float output."""

    sum_sq_err: float = 0.0
    sum_sq: float = 0.0
    max_abs_err: float = 0.0
    max_abs: float = 0.0
    values: int = 0

    def add(self, other: "ErrorStats") -> "ErrorStats":
        self.sum_sq_err += other.sum_sq_err
        self.sum_sq += other.sum_sq
        self.max_abs_err = max(self.max_abs_err, other.max_abs_err)
        self.max_abs = max(self.max_abs, other.max_abs)
        self.values += other.values
        return self

    @property
    def relative_rms(self) -> float:
        """sqrt(sum err^2 / sum x^2): the RMS error relative to the RMS feature."""
        return float(np.sqrt(self.sum_sq_err / self.sum_sq)) if self.sum_sq else 0.0

    @property
    def relative_max(self) -> float:
        """max |err| / max |x|."""
        return self.max_abs_err / self.max_abs if self.max_abs else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ErrorStats":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d}) if d else cls()

    def summary(self) -> dict:
        return {
            "relative_rms": self.relative_rms,
            "relative_max": self.relative_max,
            "max_abs_error": self.max_abs_err,
            "values": self.values,
        }


def error_terms(x: mx.array, values: mx.array, scales, valid: Optional[mx.array]) -> mx.array:
    """Per tile of a (B, L, D) batch: [sum err^2, sum x^2, max |err|, max |x|, count]
    over its valid rows, as a lazy (B, 5) array."""
    x = x.astype(mx.float32)
    err = restore(values, scales, mx.float32) - x
    if valid is not None:  # (B, L) -> zero the padded rows
        keep = valid[..., None].astype(mx.float32)
        err, x = err * keep, x * keep
        count = mx.sum(keep, axis=(1, 2)) * x.shape[-1]
    else:
        count = mx.full((x.shape[0],), float(x.shape[1] * x.shape[2]))
    return mx.stack(
        [
            mx.sum(err * err, axis=(1, 2)),
            mx.sum(x * x, axis=(1, 2)),
            mx.max(mx.abs(err), axis=(1, 2)),
            mx.max(mx.abs(x), axis=(1, 2)),
            count,
        ],
        axis=1,
    )


def stats_from(row) -> ErrorStats:
    """ErrorStats of one row of ``error_terms``."""
    s, q, me, mx_, n = (float(v) for v in np.asarray(row, dtype=np.float64))
    return ErrorStats(s, q, me, mx_, int(n))


def to_numpy(a: mx.array) -> np.ndarray:
    """An MLX array as numpy, bfloat16 as its raw uint16 bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)
