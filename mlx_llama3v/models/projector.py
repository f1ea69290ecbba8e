"""Projectors: map vision-tower features into the language model's embedding space.

Three kinds, chosen by ``ProjectorConfig.kind`` (see its docstring):
``resampler`` (MiniCPM-Llama3-V 2.5 / the released Llama 3-V), ``attention``
(the article's two transformer blocks + linear map) and ``mlp2x_gelu`` (Bunny).
Every kind is called as ``projector(features, batch)`` with the ``TileBatch`` the
features came from, and returns one row block per tile.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..config import ProjectorConfig
from .vision import EncoderLayer, TileBatch


def sincos_1d(dims: int, pos: np.ndarray) -> np.ndarray:
    # float32 throughout, as the published (numpy) code computes it
    omega = 1.0 / 10000 ** (np.arange(dims // 2, dtype=np.float32) / np.float32(dims / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float32), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@lru_cache(maxsize=256)
def sincos_2d(dims: int, grid: Tuple[int, int]) -> np.ndarray:
    """MiniCPM's 2D sin-cos table for a (rows, cols) grid, flattened row-major.

    The first half of the channels encodes the column index, the second the row
    index (numpy ``meshgrid(w, h)`` order in the original code).
    """
    rows, cols = grid
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return np.concatenate([sincos_1d(dims // 2, j), sincos_1d(dims // 2, i)], axis=1)


class MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` parameters (packed q|k|v ``in_proj``)."""

    def __init__(self, dims: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = mx.zeros((3 * dims, dims))
        self.in_proj_bias = mx.zeros((3 * dims,))
        self.out_proj = nn.Linear(dims, dims)

    def __call__(self, q: mx.array, k: mx.array, v: mx.array, mask=None) -> mx.array:
        wq, wk, wv = mx.split(self.in_proj_weight, 3)
        bq, bk, bv = mx.split(self.in_proj_bias, 3)
        B, L = k.shape[:2]
        h = self.num_heads
        q = (q @ wq.T + bq).reshape(q.shape[0], -1, h, q.shape[-1] // h).transpose(0, 2, 1, 3)
        k = (k @ wk.T + bk).reshape(B, L, h, -1).transpose(0, 2, 1, 3)
        v = (v @ wv.T + bv).reshape(B, L, h, -1).transpose(0, 2, 1, 3)
        q = mx.broadcast_to(q, (B,) + q.shape[1:])
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, -1, h * q.shape[-1]))


class Resampler(nn.Module):
    """MiniCPM's resampler: ``num_queries`` learned queries cross-attend to a tile.

    keys = ln_kv(kv_proj(x)) + 2D sin-cos position, values = ln_kv(kv_proj(x));
    output = ln_post(attention) @ proj.
    """

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        D, eps = config.text_hidden_size, config.layer_norm_eps
        self.query = mx.zeros((config.num_queries, D))
        self.kv_proj = nn.Linear(config.vision_hidden_size, D, bias=False)
        self.attn = MultiheadAttention(D, config.resampler_heads)
        self.ln_q = nn.LayerNorm(D, eps=eps)
        self.ln_kv = nn.LayerNorm(D, eps=eps)
        self.ln_post = nn.LayerNorm(D, eps=eps)
        self.proj = mx.zeros((D, D))

    def positions(self, batch: TileBatch) -> mx.array:
        D = self.query.shape[1]
        pos = np.zeros((len(batch.grids), batch.patches.shape[1], D), dtype=np.float32)
        for b, (grid, n) in enumerate(zip(batch.grids, batch.lengths)):
            pos[b, :n] = sincos_2d(D, grid)
        return mx.array(pos)

    def __call__(self, x: mx.array, batch: TileBatch) -> mx.array:
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query)[None]
        out = self.attn(q, x + self.positions(batch).astype(x.dtype), x, batch.mask)
        return self.ln_post(out) @ self.proj

    def sanitize(self, weights: dict) -> dict:
        return {k: v for k, v in weights.items() if k != "pos_embed"}


class AttentionProjector(nn.Module):
    """The article's projector: pre-LN transformer blocks, LayerNorm, linear map."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        dims = config.vision_hidden_size
        self.layers = [
            EncoderLayer(
                dims,
                config.num_attention_heads,
                config.intermediate_size,
                config.layer_norm_eps,
                config.hidden_act,
            )
            for _ in range(config.num_layers)
        ]
        self.norm = nn.LayerNorm(dims, eps=config.layer_norm_eps)
        self.proj = nn.Linear(dims, config.text_hidden_size)

    def __call__(self, x: mx.array, batch: TileBatch) -> mx.array:
        for layer in self.layers:
            x = layer(x, batch.mask)
        return self.proj(self.norm(x))

    def sanitize(self, weights: dict) -> dict:
        return weights


class MLPProjector(nn.Module):
    """LLaVA's ``mlp2x_gelu``: Linear, GELU (exact), Linear; keys ``layers.{0,2}``."""

    def __init__(self, config: ProjectorConfig):
        super().__init__()
        D = config.text_hidden_size
        self.layers = [nn.Linear(config.vision_hidden_size, D), nn.GELU(), nn.Linear(D, D)]

    def __call__(self, x: mx.array, batch: TileBatch) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x

    def sanitize(self, weights: dict) -> dict:
        return weights


KINDS = {"resampler": Resampler, "attention": AttentionProjector, "mlp2x_gelu": MLPProjector}


def build_projector(config: ProjectorConfig) -> nn.Module:
    return KINDS[config.kind](config)


def tokens_per_tile(config: ProjectorConfig, patches: int) -> int:
    """How many LM tokens one tile of ``patches`` patches becomes."""
    return config.num_queries if config.kind == "resampler" else patches
