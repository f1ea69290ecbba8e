"""Images in, model input out: loading, slicing, per-family preprocessing, prompts.

``load_image`` normalises any image source to RGB; ``slice_image`` is MiniCPM-Llama3-V
2.5's LLaVA-UHD slicing; ``preprocess_image`` makes the normalised tiles of one image
for a family (schema of ``processor_config`` and each family's ``FamilyLayout`` in
``preprocess``); ``build_prompt`` turns a conversation with images into token ids and
tiles in matching order; ``Processor`` is a model's tokenizer and processor_config as
one callable (what ``load`` returns beside the model).
"""

from .images import MAX_IMAGE_PIXELS, ImageError, load_image
from .preprocess import (
    BUNNY_SYSTEM_PROMPT,
    FAMILY_LAYOUTS,
    FamilyLayout,
    ProcessedImage,
    default_processor_config,
    expand_to_square,
    family_layout,
    fixed_size_tiles,
    normalize,
    preprocess_image,
    resolve_processor_config,
)
from .processor import Processor
from .prompts import PromptError, PromptInputs, build_prompt, special_token_id
from .slicing import (
    choose_grid,
    ensure_divide,
    find_best_resize,
    get_refine_size,
    slice_image,
    split_to_tiles,
)

__all__ = [
    "MAX_IMAGE_PIXELS",
    "BUNNY_SYSTEM_PROMPT",
    "FAMILY_LAYOUTS",
    "FamilyLayout",
    "ImageError",
    "ProcessedImage",
    "Processor",
    "PromptError",
    "PromptInputs",
    "build_prompt",
    "choose_grid",
    "default_processor_config",
    "ensure_divide",
    "expand_to_square",
    "family_layout",
    "find_best_resize",
    "fixed_size_tiles",
    "get_refine_size",
    "load_image",
    "normalize",
    "preprocess_image",
    "resolve_processor_config",
    "slice_image",
    "special_token_id",
    "split_to_tiles",
]
