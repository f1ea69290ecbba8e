"""slice_image against an independent implementation of MiniCPM-Llama3-V 2.5's slicing.

The reference below is written from the pseudo-code in the checkpoint notes, structured
differently on purpose (integer ceil, numpy argmin, numpy crops); it shares with the
code under test only PIL's bicubic resize, which is part of the published algorithm.
"""

import math

import numpy as np
import pytest
from PIL import Image

from mlx_llama3v.processing import (
    choose_grid,
    ensure_divide,
    find_best_resize,
    slice_image,
)


def _snap(x, q):
    k = round(x / q)  # Python's round: half to even
    return q * k if k >= 1 else q


def _fit(w, h, S, p, upscale):
    if upscale or w * h > S * S:
        ratio = w / h
        h = int(S / math.sqrt(ratio))
        w = int(h * ratio)
    return _snap(w, p), _snap(h, p)


def reference_slice(img, max_slices=9, S=448, p=14):
    """Returns (source size, grid, refined size, list of uint8 arrays)."""
    W, H = img.size
    n_target = min(-(-(W * H) // (S * S)), max_slices)
    if n_target <= 1:
        size = _fit(W, H, S, p, True)
        return [np.asarray(img.resize(size, Image.BICUBIC))], None
    source = np.asarray(img.resize(_fit(W, H, S, p, False), Image.BICUBIC))
    pairs = []
    for n in range(n_target - 1, n_target + 2):
        if n == 1 or n > max_slices:
            continue
        pairs += [(d, n // d) for d in range(1, n + 1) if n % d == 0]
    errors = np.array([abs(math.log(W / H) - math.log(c / r)) for c, r in pairs])
    cols, rows = pairs[int(np.argmin(errors))]  # argmin: first of equals, as strict <
    tile_w, tile_h = _fit(_snap(W, cols) / cols, _snap(H, rows) / rows, S, p, True)
    refined = np.asarray(img.resize((tile_w * cols, tile_h * rows), Image.BICUBIC))
    crops = [
        refined[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w]
        for r in range(rows)
        for c in range(cols)
    ]
    return [source] + crops, (cols, rows)


def _noise_image(w, h, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


FIXED_SIZES = [
    (1, 1),
    (5, 3),
    (3, 5),
    (14, 14),
    (447, 447),
    (448, 448),
    (449, 449),
    (448, 449),
    (500, 500),
    (640, 480),
    (896, 448),
    (1000, 500),
    (1000, 1000),
    (1344, 900),
    (1920, 1080),
    (4000, 3000),
    (3000, 4000),
    (1, 4000),
    (4000, 1),
    (2, 3000),
    (3000, 7),
    (1344, 1344),
]


def _random_sizes(count=40, seed=1234):
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(count):
        area = math.exp(rng.uniform(math.log(100), math.log(3.5e6)))
        ratio = math.exp(rng.uniform(math.log(1 / 12), math.log(12)))
        w = max(1, int(math.sqrt(area * ratio)))
        h = max(1, int(math.sqrt(area / ratio)))
        sizes.append((w, h))
    return sizes


def _compare(img, **kwargs):
    tiles, grid = slice_image(img, **kwargs)
    ref_kwargs = {
        "max_slices": kwargs.get("max_slices", 9),
        "S": kwargs.get("scale_resolution", 448),
    }
    expected, expected_grid = reference_slice(img, **ref_kwargs)
    assert grid == expected_grid, img.size
    assert len(tiles) == len(expected)
    for tile, ref in zip(tiles, expected):
        assert tile.mode == "RGB"
        arr = np.asarray(tile)
        assert arr.shape == ref.shape, img.size
        assert arr.shape[0] % 14 == 0 and arr.shape[1] % 14 == 0
        assert np.array_equal(arr, ref), img.size
    return tiles, grid


@pytest.mark.parametrize("size", FIXED_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_slice_matches_reference_fixed_sizes(size):
    _compare(_noise_image(*size, seed=size[0] * 7 + size[1]))


def test_slice_matches_reference_random_sizes():
    for i, size in enumerate(_random_sizes()):
        _compare(_noise_image(*size, seed=i))


@pytest.mark.parametrize("max_slices", [1, 2, 4, 6])
def test_slice_matches_reference_other_max_slices(max_slices):
    for size in [(1000, 500), (1344, 900), (3000, 1000), (500, 1800)]:
        tiles, grid = _compare(_noise_image(*size, seed=1), max_slices=max_slices)
        if grid is not None:
            assert grid[0] * grid[1] <= max_slices


def test_slice_other_scale_resolution():
    for size in [(900, 600), (384, 384), (1200, 300)]:
        _compare(_noise_image(*size, seed=2), scale_resolution=384)


def test_hand_computed_cases():
    # 1000x500: 3 tiles' worth of pixels; candidates for 2,3,4; (2,1) matches ratio 2 exactly
    tiles, grid = slice_image(_noise_image(1000, 500, 0))
    assert grid == (2, 1)
    # source: r=2, h=int(448/sqrt 2)=316, w=632 -> (630, 322); tiles 500x500 -> 448x448
    assert [t.size for t in tiles] == [(630, 322), (448, 448), (448, 448)]
    # 1344x900 wants about 7 tiles; 3 cols x 2 rows has the closest ratio
    tiles, grid = slice_image(_noise_image(1344, 900, 0))
    assert grid == (3, 2) and len(tiles) == 7
    # 1x1 is upscaled to 448x448, never split
    tiles, grid = slice_image(_noise_image(1, 1, 0))
    assert grid is None and [t.size for t in tiles] == [(448, 448)]


def test_tie_goes_to_the_first_candidate():
    # 500x500 wants 2 tiles: (1, 2) and (2, 1) are equally far from ratio 1; strict <
    # keeps the first one listed, cols=1, rows=2
    assert choose_grid((500, 500)) == (1, 2)
    tiles, grid = slice_image(_noise_image(500, 500, 3))
    assert grid == (1, 2)
    assert tiles[1].size == tiles[2].size


def test_crops_come_row_by_row():
    img = _noise_image(1344, 900, 5)
    tiles, (cols, rows) = slice_image(img)
    tw, th = tiles[1].size
    refined = np.asarray(img.resize((tw * cols, th * rows), Image.BICUBIC))
    # the last tile is the bottom-right corner, the second the top-left
    assert np.array_equal(np.asarray(tiles[1]), refined[:th, :tw])
    assert np.array_equal(np.asarray(tiles[cols + 1]), refined[th : 2 * th, :tw])
    assert np.array_equal(np.asarray(tiles[-1]), refined[-th:, -tw:])


def test_never_split():
    img = _noise_image(2000, 1000, 4)
    tiles, grid = slice_image(img, never_split=True)
    assert grid is None and len(tiles) == 1
    assert tiles[0].size == find_best_resize(img.size, 448, 14, allow_upscale=True)


def test_helpers():
    assert ensure_divide(7, 14) == 14  # round(0.5) == 0, then at least one patch
    assert ensure_divide(21, 14) == 28  # round(1.5) == 2
    assert ensure_divide(35, 14) == 28  # round(2.5) == 2: half to even
    assert ensure_divide(0, 14) == 14
    assert find_best_resize((100, 100)) == (98, 98)  # small: no resize unless upscale
    assert find_best_resize((100, 100), allow_upscale=True) == (448, 448)
    # r=4/3: h=int(448/1.1547)=387, w=int(387*4/3)=516 -> (518, 392)
    assert find_best_resize((4000, 3000)) == (518, 392)
    assert choose_grid((448, 448)) is None
    assert choose_grid((449, 448)) == (2, 1)  # a bit wider than tall
    assert choose_grid((448, 449)) == (1, 2)
    # 60 tiles' worth, capped at 9: candidates for 8 and 9; (3, 3) is closest to 4:3
    assert choose_grid((4000, 3000)) == (3, 3)
