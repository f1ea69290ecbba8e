"""SigLIP vision towers: fixed-resolution SigLIP and its NaViT (Idefics2) variant.

Both variants share one transformer; they differ only in how position ids are
chosen, so one class serves both:

- ``siglip``: ``SiglipVisionModel``. Every tile is ``image_size`` square and patch
  ``i`` uses row ``i`` of the learned position table.
- ``navit``: ``Idefics2VisionTransformer``. Tiles of any patch grid; fractional
  patch coordinates are bucketized onto the ``image_size / patch_size`` square
  table. MiniCPM-Llama3-V 2.5 feeds every tile as a one-patch-high strip, so its
  ids only use row 0 of the table (``strip_positions``), and computes the fractional
  coordinates as transformers 4.40 did (``navit_coords`` "arange", see below).

The patch convolution has stride = kernel, so it is computed as one matrix product
over flattened patches (``patchify``), which lets tiles of different sizes share a
padded batch. Padded patches are masked as attention keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import cpu
from ..config import VisionConfig

ACTIVATIONS = {
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_new": nn.gelu_approx,
    "gelu_approx": nn.gelu_approx,
    "gelu": nn.gelu,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


class Attention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections (SigLIP names)."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        if dims % num_heads:
            raise ValueError(f"width {dims} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dims // num_heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims)
        self.k_proj = nn.Linear(dims, dims)
        self.v_proj = nn.Linear(dims, dims)
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        B, L, D = x.shape
        split = lambda t: t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = cpu.attention(q, k, v, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dims, hidden)
        self.fc2 = nn.Linear(hidden, dims)
        self.act = cpu.activation(activation(act))

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dims: int, num_heads: int, hidden: int, eps: float, act: str):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dims, eps=eps)
        self.self_attn = Attention(dims, num_heads)
        self.layer_norm2 = nn.LayerNorm(dims, eps=eps)
        self.mlp = MLP(dims, hidden, act)

    def __call__(self, x: mx.array, mask: Optional[mx.array] = None) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [
            EncoderLayer(
                config.hidden_size,
                config.num_attention_heads,
                config.intermediate_size,
                config.layer_norm_eps,
                config.hidden_act,
            )
            for _ in range(config.num_layers_used)
        ]


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        p = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, p, stride=p)
        self.position_embedding = nn.Embedding(
            config.num_patches_per_side**2, config.hidden_size
        )

    def __call__(self, patches: mx.array, position_ids: mx.array) -> mx.array:
        w = self.patch_embedding.weight
        x = patches.astype(w.dtype) @ w.reshape(w.shape[0], -1).T + self.patch_embedding.bias
        return x + self.position_embedding(position_ids)


def patchify(tile, patch_size: int) -> np.ndarray:
    """(H, W, C) channels-last tile -> (H//p * W//p, p*p*C) rows, patches row-major.

    The row layout (kh, kw, C) matches MLX's Conv2d weight (out, kh, kw, C). As in
    a "valid" convolution, pixels past the last whole patch are ignored (SigLIP's
    384 px input is 27 patches of 14 px plus 6 unused pixels).
    """
    tile = np.asarray(tile, dtype=np.float32)
    p = patch_size
    h, w, C = tile.shape[0] // p, tile.shape[1] // p, tile.shape[2]
    if h == 0 or w == 0:
        raise ValueError(f"tile of {tile.shape[1]}x{tile.shape[0]} pixels is smaller than one {p}px patch")
    x = tile[: h * p, : w * p].reshape(h, p, w, p, C).transpose(0, 2, 1, 3, 4)
    return x.reshape(-1, p * p * C)


def torch_arange_f32(start: float, end: float, step: float) -> np.ndarray:
    """``torch.arange(start, end, step)`` with a float32 result, bit for bit as PyTorch's
    CPU kernel computes it (the NaViT position ids hinge on exact ties).

    The length is ``ceil((end - start) / step)`` in double. The kernel fills 16
    elements per loop iteration as two 8-wide vectors, each from a float32 base
    ``start + step * i0`` plus ``k * step`` in double; the remainder after the last
    whole 16 is filled one by one as ``start + step * i`` in double. Each value is
    then rounded to float32. (Checked against torch in tests/test_navit_positions.py.)
    """
    start, step = float(start), float(step)
    n = max(int(np.ceil((end - start) / step)), 0)
    out = (start + step * np.arange(n, dtype=np.float64)).astype(np.float32)
    body = n - n % 16
    if body:
        base = (start + step * np.arange(0, body, 8, dtype=np.float64)).astype(np.float32)
        lanes = base.astype(np.float64)[:, None] + step * np.arange(8, dtype=np.float64)
        out[:body] = lanes.reshape(-1).astype(np.float32)
    return out


@lru_cache(maxsize=16)
def _boundaries(num_per_side: int) -> np.ndarray:
    # Idefics2: torch.arange(1 / n, 1.0, 1 / n), the same in every transformers version
    step = 1.0 / num_per_side
    return torch_arange_f32(step, 1.0, step)


# How NaViT fractional patch coordinates are computed before bucketizing
# (``VisionConfig.navit_coords``):
# - "arange": transformers 4.40's Idefics2 embedding, torch.arange(0, 1 - 1e-6, 1 / n)
#   with 1 / n a float32 tensor (n is an int64 patch count). MiniCPM-Llama3-V 2.5 was
#   trained and published against transformers 4.40, so its weights expect these ids.
# - "clamp": transformers >= 4.4x (5.x included), clamp(i * (1 / n), max=1 - 1e-6).
# The two differ at exact ties with the bucket boundaries (e.g. 6 of the 1036 patches of
# the source tile of a 640x480 photo), and neither equals floor(num_per_side * i / n).


def _fractional_coords(n: int, coords: str) -> np.ndarray:
    step = np.float32(1.0) / np.float32(n)
    if coords == "arange":
        frac = torch_arange_f32(0.0, 1.0 - 1e-6, float(step))
        if len(frac) != n:  # 4.40 would fail to place these ids; no slicing produces it
            raise ValueError(f"transformers 4.40 position ids are undefined for {n} patches")
        return frac
    return np.minimum(np.arange(n, dtype=np.float32) * step, np.float32(1.0 - 1e-6))


def _bucketize(n: int, num_per_side: int, coords: str) -> np.ndarray:
    """Bucket of each of n patches along one side, as Idefics2's embeddings compute it."""
    frac = _fractional_coords(n, coords)
    return np.searchsorted(_boundaries(num_per_side), frac, side="right")


@lru_cache(maxsize=256)
def navit_position_ids(rows: int, cols: int, num_per_side: int, coords: str = "clamp") -> np.ndarray:
    """Position-table rows for a (rows x cols) patch grid, flattened row-major."""
    return (
        _bucketize(rows, num_per_side, coords)[:, None] * num_per_side
        + _bucketize(cols, num_per_side, coords)[None, :]
    ).reshape(-1)


@dataclass
class TileBatch:
    """Tiles flattened into one padded batch of patch rows, ready for the tower.

    ``grids`` holds each tile's (rows, cols) of patches; ``lengths`` rows*cols;
    ``mask`` is a boolean (B, 1, 1, L) key mask, or None when nothing is padded.
    """

    patches: mx.array
    position_ids: mx.array
    grids: List[Tuple[int, int]]
    lengths: List[int]
    mask: Optional[mx.array]

    @property
    def padded(self) -> bool:
        return self.mask is not None

    def valid(self) -> np.ndarray:
        """(B, L) bool array, True where a row is a real patch."""
        L = self.patches.shape[1]
        return np.arange(L)[None, :] < np.asarray(self.lengths)[:, None]


def position_ids_for(grid: Tuple[int, int], config: VisionConfig) -> np.ndarray:
    rows, cols = grid
    n = config.num_patches_per_side
    if config.variant == "siglip":
        if rows * cols != n * n:
            raise ValueError(
                f"SigLIP takes {config.image_size}x{config.image_size} tiles, "
                f"got {cols * config.patch_size}x{rows * config.patch_size}"
            )
        return np.arange(n * n)
    if config.strip_positions:
        return navit_position_ids(1, rows * cols, n, config.navit_coords)
    return navit_position_ids(rows, cols, n, config.navit_coords)


def make_tile_batch(tiles: Sequence, config: VisionConfig) -> TileBatch:
    """Patchify channels-last tiles (numpy or MLX arrays) into one padded batch."""
    if not tiles:
        raise ValueError("no tiles to encode")
    p = config.patch_size
    rows = [patchify(t, p) for t in tiles]
    grids = [(np.shape(t)[0] // p, np.shape(t)[1] // p) for t in tiles]
    lengths = [len(r) for r in rows]
    L = max(lengths)
    patches = np.zeros((len(rows), L, rows[0].shape[1]), dtype=np.float32)
    pos = np.zeros((len(rows), L), dtype=np.int32)
    for i, (r, g) in enumerate(zip(rows, grids)):
        patches[i, : len(r)] = r
        pos[i, : len(r)] = position_ids_for(g, config)
    mask = None
    if min(lengths) != L:
        valid = np.arange(L)[None, :] < np.asarray(lengths)[:, None]
        mask = mx.array(valid[:, None, None, :])
    return TileBatch(mx.array(patches), mx.array(pos), grids, lengths, mask)


class VisionTower(nn.Module):
    """The SigLIP encoder up to the configured feature layer."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = VisionEncoder(config)
        if config.use_post_layernorm:
            self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, batch: TileBatch) -> mx.array:
        x = self.embeddings(batch.patches, batch.position_ids)
        for layer in self.encoder.layers:
            x = layer(x, batch.mask)
        if self.config.use_post_layernorm:
            x = self.post_layernorm(x)
        return x

    def encode(self, tiles: Sequence) -> List[Tuple[List[int], TileBatch, mx.array]]:
        """Evaluated features for tiles, as (tile indices, batch, features) groups.

        Each group holds tiles of similar size to keep padding low. The tower is
        frozen, so its features carry no gradient, and where ``mlx_llama3v.cpu`` is
        switched on (Linux CPU) the groups take its numpy softmax/GELU or its
        per-core streams.
        """
        p = self.config.patch_size
        sizes = [(np.shape(t)[0] // p) * (np.shape(t)[1] // p) for t in tiles]
        groups = cpu.balanced_groups(sizes, cpu.tower_groups())
        batches = [make_tile_batch([tiles[i] for i in g], self.config) for g in groups]
        feats = cpu.encode_groups(lambda k: mx.stop_gradient(self(batches[k])), len(groups))
        return list(zip(groups, batches, feats))

    def sanitize(self, weights: dict) -> dict:
        """Map a transformers SigLIP / Idefics2 vision state dict onto this tower.

        Drops what the configured feature does not use: the pooling head, layers
        after the feature layer, and ``post_layernorm`` when features come earlier.
        """
        out = {}
        used = self.config.num_layers_used
        for k, v in weights.items():
            if k.startswith("vision_model."):
                k = k[len("vision_model.") :]
            if k.startswith("head.") or k.endswith("position_ids"):
                continue
            if k.startswith("encoder.layers.") and int(k.split(".")[2]) >= used:
                continue
            if k.startswith("post_layernorm.") and not self.config.use_post_layernorm:
                continue
            if k == "embeddings.patch_embedding.weight" and _is_torch_conv(v, self.config):
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out


def _is_torch_conv(w, config: VisionConfig) -> bool:
    """True for an (out, C, kh, kw) weight; MLX's layout is (out, kh, kw, C)."""
    return w.shape[1] == config.num_channels and w.shape[-1] == config.patch_size
