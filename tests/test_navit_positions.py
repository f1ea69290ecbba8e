"""MiniCPM-Llama3-V 2.5's NaViT position ids: the formula its weights were trained with.

The released model was published against transformers 4.40, whose Idefics2 embedding
computed fractional patch coordinates as ``torch.arange(0, 1 - 1e-6, 1 / n)`` and then
bucketized them; today's transformers computes ``clamp(i * (1 / n))`` and gives other ids
at exact ties. So the oracle here is that formula, written out in PyTorch in this file,
not the installed transformers; it is checked for every tile length the 2.5 slicing can
produce, enumerated from the project's slicing code.
"""

import math

import numpy as np
import pytest
import torch

from mlx_llama3v.config import VisionConfig
from mlx_llama3v.models.vision import (
    VisionTower,
    make_tile_batch,
    navit_position_ids,
    position_ids_for,
    torch_arange_f32,
)
from mlx_llama3v.processing.slicing import find_best_resize
from references import (
    NAVIT,
    assert_close,
    hf_navit,
    random_tiles,
    strip_nchw,
    to_mlx,
    valid_rows,
    with_440_positions,
)

SIDE = 70  # MiniCPM 2.5: image_size 980 / patch 14
SCALE, PATCH = 448, 14
MAX_SIDE = 8192  # the processor's image limit is 8192 x 8192 pixels


def ids_440(L: int, num_per_side: int = SIDE) -> np.ndarray:
    """transformers 4.40's ids for a one-patch-high strip of L patches, as the formula reads."""
    boundaries = torch.arange(1 / num_per_side, 1.0, 1 / num_per_side)
    frac = torch.arange(0, 1 - 1e-6, 1 / torch.tensor(L))  # 1 / int64 tensor: float32 step
    return torch.bucketize(frac, boundaries, right=True).numpy()


def ids_today(L: int, num_per_side: int = SIDE) -> np.ndarray:
    """transformers >= 5's ids for the same strip (clamped products)."""
    boundaries = torch.arange(1 / num_per_side, 1.0, 1 / num_per_side)
    frac = torch.clamp(torch.arange(L, dtype=torch.float32) * (1.0 / torch.tensor(L)), max=1 - 1e-6)
    return torch.bucketize(frac, boundaries, right=True).numpy()


def minicpm_tile_lengths():
    """Every patch count a 2.5 tile can have, for images up to MAX_SIDE px a side.

    Every tile the slicing makes (the source image, split or not, and each slice of the
    refined image) has the size ``find_best_resize`` gives for its aspect ratio r
    (upscaling, or an area above 448^2). That size depends on r only through
    h = int(448 / sqrt(r)) and w = int(h * r), so one r from each (h, w) cell covers
    every output; each is run through the project's ``find_best_resize``.
    """
    lengths = set()
    h_min, h_max = int(SCALE / math.sqrt(MAX_SIDE)), int(SCALE * math.sqrt(MAX_SIDE))
    for h in range(h_min, h_max + 1):
        r_lo, r_hi = max((SCALE / (h + 1)) ** 2, 1 / MAX_SIDE), min((SCALE / h) ** 2, MAX_SIDE)
        for w in range(int(h * r_lo), int(h * r_hi) + 1):
            lo, hi = max(r_lo, w / h), min(r_hi, (w + 1) / h)
            if lo >= hi:
                continue
            r = (lo + hi) / 2
            tw, th = find_best_resize((r, 1.0), SCALE, PATCH, allow_upscale=True)
            lengths.add((tw // PATCH) * (th // PATCH))
    return sorted(lengths)


@pytest.fixture(scope="module")
def lengths():
    found = minicpm_tile_lengths()
    # a 640x480 photo's source tile (37 x 28 patches) and a square one (32 x 32)
    assert {1036, 1024} <= set(found) and len(found) > 1000
    return found


def test_every_tile_length_gets_the_ids_the_weights_were_trained_with(lengths):
    for L in lengths:
        np.testing.assert_array_equal(
            navit_position_ids(1, L, SIDE, "arange"), ids_440(L), err_msg=f"L={L}"
        )


def test_the_trained_ids_are_not_todays_transformers(lengths):
    # guards the test above: the two formulas must differ where the issue says they do
    differ = [L for L in lengths if not np.array_equal(ids_440(L), ids_today(L))]
    assert 0.05 < len(differ) / len(lengths) < 0.5
    patches = [74, 148, 222, 370, 666, 740]  # L=1036, shared/reference/checkpoints.md
    assert list(navit_position_ids(1, 1036, SIDE, "arange")[patches]) == [5, 10, 14, 25, 44, 50]
    assert list(navit_position_ids(1, 1036, SIDE, "clamp")[patches]) == [4, 9, 15, 24, 45, 49]


def test_torch_arange_emulation_is_bit_exact():
    for n in range(1, 4000):
        step = 1 / torch.tensor(n)
        ref = torch.arange(0, 1 - 1e-6, step).numpy()
        np.testing.assert_array_equal(torch_arange_f32(0.0, 1 - 1e-6, step.item()), ref, f"n={n}")
    for n in range(1, 200):  # the bucket boundaries, step given as a Python float
        ref = torch.arange(1 / n, 1.0, 1 / n).numpy()
        np.testing.assert_array_equal(torch_arange_f32(1 / n, 1.0, 1 / n), ref, f"n={n}")


def test_only_minicpm_strips_use_the_440_formula():
    strip = VisionConfig.from_dict(dict(NAVIT, variant="navit", strip_positions=True))
    grid = VisionConfig.from_dict(dict(NAVIT, variant="navit"))
    siglip = VisionConfig.from_dict(dict(NAVIT, variant="siglip"))
    assert (strip.navit_coords, grid.navit_coords) == ("arange", "clamp")
    # a tile's strip ids come from its patch count; the fixed-size SigLIP table is 0..N-1
    strip70 = VisionConfig.from_dict(
        dict(NAVIT, image_size=SIDE * 4, variant="navit", strip_positions=True)
    )
    np.testing.assert_array_equal(position_ids_for((28, 37), strip70), ids_440(1036))
    np.testing.assert_array_equal(position_ids_for((10, 10), siglip), np.arange(100))
    with pytest.raises(ValueError, match="navit_coords"):
        VisionConfig.from_dict(dict(NAVIT, variant="navit", navit_coords="floor"))


def test_tower_features_of_a_tied_tile_match_the_440_reference():
    """A 70-per-side tower on the 28 x 37 source tile of a 640x480 photo (L = 1036)."""
    cfg = dict(NAVIT, image_size=SIDE * NAVIT["patch_size"])
    hf = hf_navit(cfg, seed=3)
    tower = VisionTower(VisionConfig.from_dict(dict(cfg, variant="navit", strip_positions=True)))
    tower.load_weights(list(tower.sanitize(to_mlx(hf.state_dict())).items()), strict=True)
    tiles = random_tiles([(28, 37), (20, 30)], NAVIT["patch_size"], seed=4)
    x, mask = strip_nchw(tiles, NAVIT["patch_size"])
    batch = make_tile_batch(tiles, tower.config)
    out = tower(batch)
    with torch.no_grad():
        today = hf(pixel_values=x, patch_attention_mask=mask).last_hidden_state
        trained = with_440_positions(hf)(
            pixel_values=x, patch_attention_mask=mask
        ).last_hidden_state
    for i, (ref, n) in enumerate(zip(valid_rows(trained, mask), batch.lengths)):
        assert_close(out[i, :n], ref)
    a, b = np.array(out[0, :1036]), valid_rows(today, mask)[0].numpy()
    assert np.abs(a - b).max() > 1e-2 * np.abs(b).max(), "today's ids would change this tile"
