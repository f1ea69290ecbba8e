"""LLaVA-UHD image slicing exactly as MiniCPM-Llama3-V 2.5 publishes it.

An image larger than ``scale_resolution``^2 pixels is cut into a grid of at most
``max_slices`` tiles whose aspect ratio best matches the image; every tile and the
downsized whole image ("source") get sides that are multiples of ``patch_size``. The
arithmetic (Python's ``round``, ``int`` truncation, strict ``<`` when choosing the grid)
and PIL's bicubic resize are kept as published, since the model was trained on them.
Grids are ``(cols, rows)``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from PIL import Image

Grid = Tuple[int, int]


def ensure_divide(length: float, patch_size: int) -> int:
    """``length`` rounded (half to even) to a multiple of ``patch_size``, at least one."""
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(
    size: Tuple[float, float],
    scale_resolution: int = 448,
    patch_size: int = 14,
    allow_upscale: bool = False,
) -> Tuple[int, int]:
    """(width, height) with the aspect ratio of ``size`` and about ``scale_resolution``^2
    pixels, when ``size`` is larger than that or ``allow_upscale``; sides made multiples
    of ``patch_size``."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        r = width / height
        height = int(scale_resolution / math.sqrt(r))
        width = int(height * r)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(
    size: Tuple[int, int],
    grid: Grid,
    scale_resolution: int = 448,
    patch_size: int = 14,
    allow_upscale: bool = True,
) -> Tuple[int, int]:
    """Size of the refined image: ``grid`` tiles, each resized by ``find_best_resize``."""
    cols, rows = grid
    tile_w = ensure_divide(size[0], cols) / cols
    tile_h = ensure_divide(size[1], rows) / rows
    best_w, best_h = find_best_resize((tile_w, tile_h), scale_resolution, patch_size, allow_upscale)
    return best_w * cols, best_h * rows


def choose_grid(
    size: Tuple[int, int], max_slices: int = 9, scale_resolution: int = 448
) -> Optional[Grid]:
    """The slicing grid ``(cols, rows)`` for an image of ``size``, or None if not split."""
    width, height = size
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slices)
    if multiple <= 1:
        return None
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slices]
    candidates = [(m, n // m) for n in counts for m in range(1, n + 1) if n % m == 0]
    log_ratio = math.log(width / height)
    best, best_error = None, float("inf")
    for cols, rows in candidates:
        error = abs(log_ratio - math.log(cols / rows))
        if error < best_error:  # strict: the first of equal candidates wins
            best, best_error = (cols, rows), error
    return best


def split_to_tiles(image: Image.Image, grid: Grid) -> List[Image.Image]:
    """Crop ``image`` into ``grid`` equal tiles, row by row."""
    cols, rows = grid
    tile_w, tile_h = image.width // cols, image.height // rows
    return [
        image.crop((c * tile_w, r * tile_h, (c + 1) * tile_w, (r + 1) * tile_h))
        for r in range(rows)
        for c in range(cols)
    ]


def slice_image(
    image: Image.Image,
    max_slices: int = 9,
    scale_resolution: int = 448,
    patch_size: int = 14,
    never_split: bool = False,
) -> Tuple[List[Image.Image], Optional[Grid]]:
    """Slice an RGB image the MiniCPM-Llama3-V 2.5 way.

    Returns ``(tiles, grid)``: tiles is the resized source image followed, when the image
    is split, by the crops of the refined image row by row; grid is ``(cols, rows)`` or
    None when the image is not split (then the source is resized, up or down, to about
    ``scale_resolution``^2 pixels).
    """
    size = image.size
    grid = None if never_split else choose_grid(size, max_slices, scale_resolution)
    if grid is None:
        best = find_best_resize(size, scale_resolution, patch_size, allow_upscale=True)
        return [image.resize(best, Image.Resampling.BICUBIC)], None
    source = image.resize(
        find_best_resize(size, scale_resolution, patch_size), Image.Resampling.BICUBIC
    )
    refine = get_refine_size(size, grid, scale_resolution, patch_size, allow_upscale=True)
    refined = image.resize(refine, Image.Resampling.BICUBIC)
    return [source] + split_to_tiles(refined, grid), grid
