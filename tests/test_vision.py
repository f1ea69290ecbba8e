"""SigLIP and NaViT towers against transformers, float32, same random weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_llama3v.config import VisionConfig
from mlx_llama3v.models.vision import VisionTower, make_tile_batch, navit_position_ids
from references import (
    NAVIT,
    SIGLIP,
    assert_close,
    hf_navit,
    hf_siglip,
    padded_nchw,
    random_tiles,
    strip_nchw,
    to_mlx,
    valid_rows,
    with_440_positions,
)


@pytest.fixture(params=[False, True], ids=["mlx-ops", "numpy-kernels"])
def kernels(request, monkeypatch):
    """Run the tower with MLX ops, or with the numpy softmax/GELU path that ``encode``
    takes on Linux CPUs (forced on, so it is checked on any platform). Yields a context
    to run the tower in and the list of softmax calls it made."""
    from mlx_llama3v import cpu

    calls = []
    if request.param:
        softmax_ = cpu.softmax_
        monkeypatch.setattr(cpu, "softmax_", lambda s: calls.append(s.shape) or softmax_(s))
    yield cpu.tower_kernels(request.param), calls, request.param


def mlx_tower(hf_model, **config):
    tower = VisionTower(VisionConfig.from_dict(config))
    tower.load_weights(list(tower.sanitize(to_mlx(hf_model.state_dict())).items()), strict=True)
    return tower


@pytest.mark.parametrize("feature_layer", [None, -2, 1])
def test_siglip_matches_transformers(feature_layer, kernels):
    hf = hf_siglip()
    tower = mlx_tower(hf, **SIGLIP, variant="siglip", feature_layer=feature_layer)
    tiles = random_tiles([(6, 6)] * 3, SIGLIP["patch_size"])
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
    ref = out.last_hidden_state if feature_layer is None else out.hidden_states[feature_layer]
    context, calls, numpy_path = kernels
    with context:
        got = tower(make_tile_batch(tiles, tower.config))
    assert len(calls) == (len(tower.encoder.layers) if numpy_path else 0)
    assert_close(got, ref)


def test_siglip_rejects_wrong_tile_size():
    tower = VisionTower(VisionConfig.from_dict(dict(SIGLIP, variant="siglip")))
    with pytest.raises(ValueError, match="SigLIP takes 24x24 tiles"):
        make_tile_batch(random_tiles([(5, 6)], 4), tower.config)


def test_feature_layer_builds_only_needed_layers():
    cfg = VisionConfig.from_dict(dict(SIGLIP, feature_layer=-2))
    tower = VisionTower(cfg)
    assert len(tower.encoder.layers) == SIGLIP["num_hidden_layers"] - 1
    assert "post_layernorm" not in tower
    with pytest.raises(ValueError, match="outside hidden_states"):
        VisionConfig.from_dict(dict(SIGLIP, feature_layer=9))


def test_sanitize_drops_only_unused_weights():
    hf = hf_siglip()
    tower = VisionTower(VisionConfig.from_dict(dict(SIGLIP, feature_layer=-2)))
    weights = tower.sanitize(to_mlx(hf.state_dict()))
    assert not any(k.startswith(("head.", "post_layernorm.")) for k in weights)
    assert not any(k.startswith("encoder.layers.2.") for k in weights)
    tower.load_weights(list(weights.items()), strict=True)  # nothing missing


GRIDS = [(3, 5), (4, 4), (2, 7), (5, 2)]


def test_navit_padded_batch_matches_idefics2(kernels):
    hf = hf_navit()
    tower = mlx_tower(hf, **NAVIT, variant="navit")
    tiles = random_tiles(GRIDS, NAVIT["patch_size"], seed=1)
    x, mask = padded_nchw(tiles, NAVIT["patch_size"])
    with torch.no_grad():
        ref = hf(pixel_values=x, patch_attention_mask=mask).last_hidden_state
    batch = make_tile_batch(tiles, tower.config)
    assert batch.padded
    context, calls, numpy_path = kernels
    with context:
        out = tower(batch)
    assert len(calls) == (NAVIT["num_hidden_layers"] if numpy_path else 0)
    for i, (r, n) in enumerate(zip(valid_rows(ref, mask), batch.lengths)):
        assert_close(out[i, :n], r)


def test_navit_strip_layout_matches_idefics2_fed_strips():
    # MiniCPM 2.5's strips use transformers 4.40's position ids (test_navit_positions.py)
    hf = with_440_positions(hf_navit())
    tower = mlx_tower(hf, **NAVIT, variant="navit", strip_positions=True)
    tiles = random_tiles(GRIDS, NAVIT["patch_size"], seed=2)
    x, mask = strip_nchw(tiles, NAVIT["patch_size"])
    with torch.no_grad():
        ref = hf(pixel_values=x, patch_attention_mask=mask).last_hidden_state
    batch = make_tile_batch(tiles, tower.config)
    out = tower(batch)
    for i, (r, n) in enumerate(zip(valid_rows(ref, mask), batch.lengths)):
        assert_close(out[i, :n], r)


def _idefics2_position_ids(num_per_side, mask):
    """Read transformers' position ids off its embeddings: table row i = i, no patches."""
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings

    cfg = Idefics2VisionConfig(hidden_size=1, image_size=num_per_side, patch_size=1)
    emb = Idefics2VisionEmbeddings(cfg)
    with torch.no_grad():
        emb.patch_embedding.weight.zero_()
        emb.patch_embedding.bias.zero_()
        emb.position_embedding.weight.copy_(torch.arange(num_per_side**2.0)[:, None])
        x = torch.zeros(mask.shape[0], 3, mask.shape[1], mask.shape[2])
        return emb(x, mask)[..., 0].round().long()


@pytest.mark.parametrize("num_per_side", [70, 10])
def test_bucketized_position_ids_match_transformers_exhaustively(num_per_side):
    # today's formula ("clamp", the generic NaViT tower): every strip length a tile of
    # up to ~470x470 px can have; MiniCPM 2.5's own is in test_navit_positions.py
    for L in range(1, 1100, 1 if num_per_side == 70 else 7):
        mask = torch.ones(1, 1, L, dtype=torch.bool)
        ref = _idefics2_position_ids(num_per_side, mask)[0].numpy()
        np.testing.assert_array_equal(navit_position_ids(1, L, num_per_side), ref, err_msg=f"L={L}")
    for rows in range(1, 40, 3):
        for cols in range(1, 40, 5):
            mask = torch.ones(1, rows, cols, dtype=torch.bool)
            ref = _idefics2_position_ids(num_per_side, mask)[0].numpy()
            np.testing.assert_array_equal(navit_position_ids(rows, cols, num_per_side), ref)


def test_pixels_past_the_last_patch_are_ignored_like_a_valid_conv():
    hf = hf_siglip()
    tower = mlx_tower(hf, **SIGLIP, variant="siglip")
    tiles = random_tiles([(6, 6)], SIGLIP["patch_size"])
    ragged = [np.pad(tiles[0], ((0, 3), (0, 2), (0, 0)), constant_values=5.0)]  # 27x26 px
    x = torch.from_numpy(np.stack(ragged)).permute(0, 3, 1, 2)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    assert_close(tower(make_tile_batch(ragged, tower.config)), ref)
    cfg = VisionConfig.from_dict(dict(NAVIT, variant="navit"))
    with pytest.raises(ValueError, match="smaller than one 4px patch"):
        make_tile_batch([np.zeros((3, 8, 3), np.float32)], cfg)


def test_balanced_groups_cover_every_tile_once_and_keep_sizes_together():
    from mlx_llama3v.cpu import balanced_groups

    sizes = [1024, 256, 1024, 1024, 256, 900, 1024]
    groups = balanced_groups(sizes, 2)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert len(groups) == 2
    loads = [sum(sizes[i] for i in g) for g in groups]
    assert max(loads) - min(loads) <= max(sizes)
    assert balanced_groups([5], 4) == [[0]]


@pytest.mark.parametrize("numpy_kernels", ["1", "0"])
def test_parallel_encode_equals_one_padded_batch(numpy_kernels, monkeypatch):
    monkeypatch.setenv("MLX_LLAMA3V_CPU_KERNELS", numpy_kernels)
    hf = hf_navit()
    tower = mlx_tower(hf, **NAVIT, variant="navit", strip_positions=True)
    tiles = random_tiles(GRIDS + [(4, 4), (3, 5)], NAVIT["patch_size"], seed=3)
    whole = tower(make_tile_batch(tiles, tower.config))
    groups = tower.encode(tiles)
    assert len(groups) > 1 or mx.default_device() != mx.cpu
    for idx, batch, feats in groups:
        for row, i in enumerate(idx):
            n = batch.lengths[row]
            np.testing.assert_allclose(feats[row, :n], whole[i, :n], atol=1e-5, rtol=1e-5)
