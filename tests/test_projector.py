"""Projectors against PyTorch references written from the published descriptions."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_llama3v.config import ProjectorConfig, VisionConfig
from mlx_llama3v.models.projector import build_projector, sincos_2d
from mlx_llama3v.models.vision import make_tile_batch
from references import (
    NAVIT,
    SIGLIP,
    TorchAttentionProjector,
    TorchMLPProjector,
    TorchResampler,
    assert_close,
    random_tiles,
    randomize,
    sincos_table,
    to_mlx,
)

GRIDS = [(3, 5), (4, 4), (2, 7)]


def load(projector, ref):
    projector.load_weights(list(projector.sanitize(to_mlx(ref.state_dict())).items()), strict=True)
    return projector


def features_for(grids, vision: dict, width: int, seed: int = 0):
    """Random vision features laid out as a padded TileBatch of the given grids."""
    batch = make_tile_batch(
        random_tiles(grids, vision["patch_size"]), VisionConfig.from_dict(vision)
    )
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(grids), batch.patches.shape[1], width)).astype(np.float32)
    return mx.array(x), torch.from_numpy(x), batch


@pytest.mark.parametrize("dims", [128, 256])
def test_sincos_table_matches_formula(dims):
    for grid in [(1, 1), (3, 5), (70, 70), (1, 37)]:
        # the published code computes in float32: args up to ~70 carry ~4e-6 rounding
        np.testing.assert_allclose(sincos_2d(dims, grid), sincos_table(dims, *grid), atol=1e-5)


@pytest.mark.parametrize("text_width,queries", [(128, 8), (256, 16)])
def test_resampler_matches_reference_with_key_padding(text_width, queries):
    ref = randomize(TorchResampler(queries, text_width, 32), seed=3)
    cfg = ProjectorConfig(
        kind="resampler", vision_hidden_size=32, text_hidden_size=text_width, num_queries=queries
    )
    proj = load(build_projector(cfg), ref)
    x, xt, batch = features_for(GRIDS, dict(NAVIT, variant="navit"), 32)
    assert batch.padded
    with torch.no_grad():
        want = ref(xt, batch.grids)
    assert_close(proj(x, batch), want)


def test_resampler_ignores_padding_content():
    cfg = ProjectorConfig(
        kind="resampler", vision_hidden_size=32, text_hidden_size=128, num_queries=4
    )
    proj = load(build_projector(cfg), randomize(TorchResampler(4, 128, 32), seed=4))
    x, _, batch = features_for(GRIDS, dict(NAVIT, variant="navit"), 32)
    noise = mx.where(mx.array(batch.valid())[..., None], 0.0, 100.0)
    np.testing.assert_allclose(proj(x, batch), proj(x + noise, batch), atol=1e-5)


def test_attention_projector_matches_reference():
    ref = randomize(TorchAttentionProjector(32, 4, 64, 256), seed=5)
    cfg = ProjectorConfig(
        kind="attention",
        vision_hidden_size=32,
        text_hidden_size=256,
        num_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    proj = load(build_projector(cfg), ref)
    x, xt, batch = features_for([(6, 6)] * 2, dict(SIGLIP, variant="siglip"), 32)
    with torch.no_grad():
        want = ref(xt)
    assert_close(proj(x, batch), want)


def test_mlp2x_gelu_matches_reference():
    ref = randomize(TorchMLPProjector(32, 256), seed=6)
    cfg = ProjectorConfig(kind="mlp2x_gelu", vision_hidden_size=32, text_hidden_size=256)
    proj = load(build_projector(cfg), ref)
    x, xt, batch = features_for([(6, 6)] * 2, dict(SIGLIP, variant="siglip"), 32)
    with torch.no_grad():
        want = ref(xt)
    assert_close(proj(x, batch), want)


def test_unknown_projector_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown projector kind 'linear'"):
        ProjectorConfig(kind="linear")
