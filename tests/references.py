"""PyTorch references and tiny random configs shared by the parity tests.

transformers has classes for SigLIP, Idefics2's NaViT tower and Llama; it has none
for MiniCPM's resampler or the article's projector, so those are written here from
the published descriptions (shared/reference/checkpoints.md), independently of the
MLX code under test.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOL = 1e-4  # max abs error <= TOL * max |reference|


def assert_close(mlx_out, ref, tol: float = TOL):
    a = np.asarray(mlx_out, dtype=np.float32)
    b = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert a.shape == b.shape, (a.shape, b.shape)
    err, scale = float(np.abs(a - b).max()), float(np.abs(b).max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol} x max|ref| {scale:.3g}"
    return err / scale


def randomize(module: nn.Module, seed: int = 0):
    """Give every parameter (LayerNorm weights and biases included) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.ndim > 1 else 16
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return module.eval()


def to_mlx(state_dict, prefix: str = "") -> dict:
    return {prefix + k: mx.array(v.detach().float().numpy()) for k, v in state_dict.items()}


# ---------------------------------------------------------------- tiny configs
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_channels=3,
    patch_size=4,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
SIGLIP = dict(VISION, image_size=24)  # 6 x 6 patches
NAVIT = dict(VISION, image_size=40)  # 10 x 10 position table

TEXT = dict(
    hidden_size=256,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=300,
    rope_theta=500000.0,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def hf_llama(text: dict = TEXT, rope_scaling=None, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**text, rope_scaling=rope_scaling)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    return randomize(model, seed), cfg


def hf_siglip(vision: dict = SIGLIP, seed: int = 0):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(**vision)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(SiglipVisionModel(cfg), seed)


def hf_navit(vision: dict = NAVIT, seed: int = 0):
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    cfg = Idefics2VisionConfig(**vision)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(Idefics2VisionTransformer(cfg), seed)


def positions_440(num_per_side: int, mask: torch.Tensor) -> torch.Tensor:
    """Idefics2 position ids as transformers 4.40 computed them, which MiniCPM-Llama3-V 2.5
    was trained with: per tile, ``torch.arange(0, 1 - 1e-6, 1 / n)`` (n the int64 patch
    count along a side), bucketized on ``arange(1/N, 1, 1/N)`` with ``right=True``.
    ``mask`` is the (B, h, w) patch mask; padding gets id 0. Written from the formula."""
    boundaries = torch.arange(1 / num_per_side, 1.0, 1 / num_per_side)
    ids = torch.zeros(mask.shape[0], mask.shape[1] * mask.shape[2], dtype=torch.long)
    for b, m in enumerate(mask):
        n_h, n_w = m[:, 0].sum(), m[0].sum()
        h = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / n_h), boundaries, right=True)
        w = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / n_w), boundaries, right=True)
        ids[b][m.reshape(-1)] = (h[:, None] * num_per_side + w[None, :]).reshape(-1)
    return ids


def with_440_positions(tower):
    """An Idefics2 vision transformer whose embeddings use ``positions_440``."""
    emb = tower.embeddings

    def forward(pixel_values, patch_attention_mask):
        x = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return x + emb.position_embedding(
            positions_440(emb.num_patches_per_side, patch_attention_mask)
        )

    emb.forward = forward
    return tower


# ------------------------------------------------------------ image layouts
def random_tiles(grids, patch: int, seed: int = 0):
    """Channels-last float32 tiles for (rows, cols) patch grids."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-1, 1, (r * patch, c * patch, 3)).astype(np.float32) for r, c in grids]


def padded_nchw(tiles, patch: int):
    """Idefics2's input: tiles zero-padded to one size, with a (B, h, w) patch mask."""
    H = max(t.shape[0] for t in tiles)
    W = max(t.shape[1] for t in tiles)
    x = torch.zeros(len(tiles), 3, H, W)
    mask = torch.zeros(len(tiles), H // patch, W // patch, dtype=torch.bool)
    for i, t in enumerate(tiles):
        x[i, :, : t.shape[0], : t.shape[1]] = torch.from_numpy(t).permute(2, 0, 1)
        mask[i, : t.shape[0] // patch, : t.shape[1] // patch] = True
    return x, mask


def strip_nchw(tiles, patch: int):
    """MiniCPM 2.5's layout: each tile's patches side by side in a one-patch-high strip.

    Mirrors its ``reshape_by_patch`` (unfold, then lay patches along the width).
    """
    strips = []
    for t in tiles:
        img = torch.from_numpy(t).permute(2, 0, 1)
        cols = F.unfold(img[None], (patch, patch), stride=(patch, patch))[0]  # (3*p*p, L)
        cols = cols.reshape(3, patch, patch, -1).permute(0, 1, 3, 2)
        strips.append(cols.reshape(3, patch, -1))
    L = max(s.shape[-1] for s in strips) // patch
    x = torch.zeros(len(tiles), 3, patch, L * patch)
    mask = torch.zeros(len(tiles), 1, L, dtype=torch.bool)
    for i, s in enumerate(strips):
        x[i, :, :, : s.shape[-1]] = s
        mask[i, 0, : s.shape[-1] // patch] = True
    return x, mask


def valid_rows(out: torch.Tensor, mask: torch.Tensor):
    """Per-tile real-patch rows of a padded Idefics2 output, row-major."""
    flat = mask.reshape(mask.shape[0], -1)
    return [out[i][flat[i]] for i in range(out.shape[0])]


# ----------------------------------------------------------- projector refs
def sincos_table(dims: int, rows: int, cols: int) -> torch.Tensor:
    """emb[i, j] = [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k / (dims/4))."""
    quarter = dims // 4
    w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    i = torch.arange(rows, dtype=torch.float64)[:, None, None] * w
    j = torch.arange(cols, dtype=torch.float64)[None, :, None] * w
    i, j = i.expand(rows, cols, quarter), j.expand(rows, cols, quarter)
    emb = torch.cat([j.sin(), j.cos(), i.sin(), i.cos()], dim=-1)
    return emb.reshape(rows * cols, dims).float()


class TorchResampler(nn.Module):
    """MiniCPM-Llama3-V 2.5's resampler, from the reference doc."""

    def __init__(self, num_queries: int, dims: int, kv_dims: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, dims))
        self.kv_proj = nn.Linear(kv_dims, dims, bias=False)
        self.attn = nn.MultiheadAttention(dims, dims // 128)
        self.ln_q = nn.LayerNorm(dims, eps=1e-6)
        self.ln_kv = nn.LayerNorm(dims, eps=1e-6)
        self.ln_post = nn.LayerNorm(dims, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(dims, dims))

    def forward(self, x, grids):
        """x: (B, L, kv_dims) padded; grids: (rows, cols) per tile."""
        B, L, _ = x.shape
        D = self.query.shape[1]
        pos = torch.zeros(B, L, D)
        pad = torch.ones(B, L, dtype=torch.bool)
        for b, (r, c) in enumerate(grids):
            pos[b, : r * c] = sincos_table(D, r, c)
            pad[b, : r * c] = False
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        q = self.ln_q(self.query)[:, None].repeat(1, B, 1)
        out = self.attn(q, x + pos.permute(1, 0, 2), x, key_padding_mask=pad)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


class TorchBlock(nn.Module):
    """Pre-LayerNorm transformer block with SigLIP parameter names."""

    def __init__(self, dims: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.layer_norm1 = nn.LayerNorm(dims, eps=1e-6)
        self.layer_norm2 = nn.LayerNorm(dims, eps=1e-6)
        self.self_attn = nn.ModuleDict(
            {n: nn.Linear(dims, dims) for n in ("q_proj", "k_proj", "v_proj", "out_proj")}
        )
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(dims, hidden), "fc2": nn.Linear(hidden, dims)})

    def forward(self, x):
        B, L, D = x.shape
        a = self.self_attn
        h = self.layer_norm1(x)
        split = lambda t: t.reshape(B, L, self.heads, -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(
            split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h))
        )
        x = x + a.out_proj(att.transpose(1, 2).reshape(B, L, D))
        h = self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x)), approximate="tanh"))
        return x + h


class TorchAttentionProjector(nn.Module):
    """The article's projector: two pre-LN blocks, LayerNorm, Linear to the LM width."""

    def __init__(self, dims: int, heads: int, hidden: int, out_dims: int, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(TorchBlock(dims, heads, hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(dims, eps=1e-6)
        self.proj = nn.Linear(dims, out_dims)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.proj(self.norm(x))


class TorchMLPProjector(nn.Module):
    """LLaVA / Bunny ``mlp2x_gelu``."""

    def __init__(self, dims: int, out_dims: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dims, out_dims), nn.GELU(), nn.Linear(out_dims, out_dims)
        )

    def forward(self, x):
        return self.layers(x)
