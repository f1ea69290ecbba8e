"""Per-family image preprocessing and the ``processor_config`` schema.

``ModelConfig.processor_config`` is a plain dict; ``resolve_processor_config`` fills
it in from the family's defaults (``default_processor_config``). Keys:

==================  =================================================================
key                 meaning (defaults: minicpm_v2_5 / siglip_llama3 / bunny)
==================  =================================================================
family              one of ``config.FAMILIES``; picks the defaults and the prompt layout
image_size          minicpm: slicing ``scale_resolution`` (448); others: the fixed square
                    tile side fed to SigLIP (384)
patch_size          vision patch size (14)
slice               split large images into tiles (True / False / False; bunny: must
                    stay False). For minicpm False means ``never_split``: one tile,
                    resized to about ``image_size``^2 pixels.
max_slices          most tiles besides the source image (9)
mean, std           per-channel normalisation after scaling to [0, 1] ((0.5,)*3)
pad_color           None, or an RGB triple: pad to a centred square with it first
                    (LLaVA's expand2square); bunny (127, 127, 127)
tokens_per_tile     placeholder tokens per tile: 96 (resampler queries) / 729 / 729
image_token         the placeholder whose embeddings are replaced ("<unk>" / "<unk>" /
                    "<|reserved_special_token_0|>")
image_start/end     tokens around each tile block ("<image>", "</image>"; bunny None)
slice_start/end     tokens around the slices of a split image ("<slice>", "</slice>")
text_start/end      tokens around user text (siglip_llama3: "<text>", "</text>")
system_prompt       bunny's system sentence (others None: no default system message)
==================  =================================================================

Aliases read from MiniCPM's ``config.json``/``slice_config``: ``scale_resolution`` ->
image_size, ``max_slice_nums`` -> max_slices, ``query_num`` -> tokens_per_tile,
``slice_mode`` -> slice. Unknown keys are kept as they are.

Tiles are float32 numpy arrays (H, W, 3), channels-last, normalised. Minicpm tiles have
variable sizes, multiples of ``patch_size``. The fixed-resolution families give
``image_size`` squares (384): as in SigLIP, the vision tower's stride-14 convolution
uses the first 27 x 14 = 378 rows and columns (27 x 27 = 729 patches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image

from .images import MAX_IMAGE_PIXELS, load_image
from .slicing import Grid, choose_grid, slice_image, split_to_tiles

BUNNY_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

_COMMON = {
    "patch_size": 14,
    "max_slices": 9,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "pad_color": None,
    "image_token": "<unk>",
    "image_start": "<image>",
    "image_end": "</image>",
    "slice_start": "<slice>",
    "slice_end": "</slice>",
    "text_start": None,
    "text_end": None,
    "system_prompt": None,
}

# keyed by config.FAMILIES (not imported: that would pull in mlx for image preprocessing)
_FAMILY = {
    "minicpm_v2_5": {"image_size": 448, "slice": True, "tokens_per_tile": 96},
    "siglip_llama3": {
        "image_size": 384,
        "slice": False,
        "tokens_per_tile": 729,
        "text_start": "<text>",
        "text_end": "</text>",
    },
    "bunny": {
        "image_size": 384,
        "slice": False,
        "tokens_per_tile": 729,
        "pad_color": (127, 127, 127),
        "image_token": "<|reserved_special_token_0|>",
        "image_start": None,
        "image_end": None,
        "slice_start": None,
        "slice_end": None,
        "system_prompt": BUNNY_SYSTEM_PROMPT,
    },
}

@dataclass(frozen=True)
class FamilyLayout:
    """What a family does differently, read from its processor_config's ``family``.

    ``tiling``: "slices" (LLaVA-UHD slicing, tiles of variable size) or "fixed" (squares
    of ``image_size``); ``can_slice``: whether ``slice`` may be True; ``conversation``:
    "chat_template" (the tokenizer's Llama 3 template) or "bunny" (``USER:``/
    ``ASSISTANT:`` turns after a system sentence); ``wraps_user_text``: user text goes
    between ``text_start`` and ``text_end`` (the article's layout).
    """

    tiling: str
    can_slice: bool
    conversation: str
    wraps_user_text: bool
    extra_tokens: Tuple[str, ...] = ()  # processor_config keys of tokens every prompt needs


FAMILY_LAYOUTS = {
    "minicpm_v2_5": FamilyLayout("slices", True, "chat_template", False),
    "siglip_llama3": FamilyLayout("fixed", True, "chat_template", True, ("text_start", "text_end")),
    "bunny": FamilyLayout("fixed", False, "bunny", False),
}


def family_layout(cfg: Mapping[str, Any]) -> FamilyLayout:
    """The layout of a (resolved) processor_config's family."""
    return FAMILY_LAYOUTS[cfg["family"]]


_ALIASES = {
    "scale_resolution": "image_size",
    "max_slice_nums": "max_slices",
    "query_num": "tokens_per_tile",
    "slice_mode": "slice",
}


def default_processor_config(family: str) -> Dict[str, Any]:
    """The full processor_config of ``family`` with every key at its default."""
    if family not in _FAMILY:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(_FAMILY)})")
    return {"family": family, **_COMMON, **_FAMILY[family]}


def resolve_processor_config(
    config: Optional[Mapping[str, Any]] = None, family: Optional[str] = None
) -> Dict[str, Any]:
    """``config`` over the defaults of its family (``config["family"]``, else ``family``)."""
    given = {_ALIASES.get(k, k): v for k, v in dict(config or {}).items()}
    family = given.get("family") or family
    if family is None:
        raise ValueError("processor_config has no 'family' and none was given")
    out = default_processor_config(family)
    out.update(given)
    out["family"] = family
    _validate(out)
    return out


def _validate(cfg: Dict[str, Any]) -> None:
    for key in ("image_size", "patch_size", "tokens_per_tile"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"processor_config[{key!r}] must be a positive int, got {cfg[key]!r}")
    if cfg["slice"] and not family_layout(cfg).can_slice:
        raise ValueError(
            f"the {cfg['family']} family does not slice images: set processor_config['slice'] False"
        )
    for key in ("mean", "std"):
        if len(cfg[key]) != 3:
            raise ValueError(f"processor_config[{key!r}] needs 3 values, got {cfg[key]!r}")
    if any(s == 0 for s in cfg["std"]):
        raise ValueError("processor_config['std'] must not contain 0")


@dataclass
class ProcessedImage:
    """One image as the vision tower takes it.

    ``tiles``: float32 (H, W, 3) arrays, the source image first, then the slices row by
    row; ``grid``: ``(cols, rows)`` of the slices, or None when not split.
    """

    tiles: List[np.ndarray]
    grid: Optional[Grid]


def preprocess_image(
    image: Any,
    processor_config: Optional[Mapping[str, Any]] = None,
    max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
) -> ProcessedImage:
    """Load ``image`` (anything ``load_image`` takes) and make its normalised tiles."""
    cfg = resolve_processor_config(processor_config)
    img = load_image(image, max_pixels=max_pixels)
    if cfg["pad_color"] is not None:
        img = expand_to_square(img, tuple(cfg["pad_color"]))
    if family_layout(cfg).tiling == "slices":
        tiles, grid = slice_image(
            img, cfg["max_slices"], cfg["image_size"], cfg["patch_size"], never_split=not cfg["slice"]
        )
    else:
        tiles, grid = fixed_size_tiles(img, cfg["image_size"], cfg["max_slices"], cfg["slice"])
    return ProcessedImage([normalize(t, cfg["mean"], cfg["std"]) for t in tiles], grid)


def fixed_size_tiles(
    image: Image.Image, size: int, max_slices: int = 9, split: bool = False
) -> Tuple[List[Image.Image], Optional[Grid]]:
    """``size`` x ``size`` tiles: the whole image resized, then (``split``) the grid that
    ``choose_grid`` picks at ``scale_resolution=size``, cut from the image resized to
    ``(size * cols, size * rows)``, row by row."""
    source = image.resize((size, size), Image.Resampling.BICUBIC)
    grid = choose_grid(image.size, max_slices, size) if split else None
    if grid is None:
        return [source], None
    cols, rows = grid
    refined = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    return [source] + split_to_tiles(refined, grid), grid


def expand_to_square(image: Image.Image, color: Tuple[int, int, int]) -> Image.Image:
    """Pad ``image`` to a square of side max(W, H) filled with ``color``, image centred
    (LLaVA's expand2square: offset (side - short) // 2)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), color)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def normalize(tile: Image.Image, mean, std) -> np.ndarray:
    """float32 (H, W, 3): ``(x / 255 - mean) / std``."""
    x = np.asarray(tile, dtype=np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
