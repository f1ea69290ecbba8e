"""MiniCPM-Llama3-V 2.5, and the released Llama 3-V, which is the same checkpoint.

Key prefixes: ``vpm.`` or ``vison.`` (NaViT SigLIP tower), ``resampler.`` or
``projection.`` (one-layer cross-attention resampler), ``llm.`` (Llama 3). The
Llama 3-V ``config.json`` (model_type "llama3v") lacks ``vision_config`` and the
slice settings, so what the tensors do not say is filled with MiniCPM 2.5's published
values: queries from the ``query`` tensor (never the published code's default 64), every
stored vision layer (``drop_vision_last_layer`` absent means false, not its default
true), 9 slices at 448 px (not one slice), rope_theta 5e5 and RMSNorm eps 1e-5 (Llama 3
8B). Its vision tower uses transformers 4.40's position ids (``navit_coords``
"arange"), the formula the released weights were trained with.
The tokenizer must already hold the special tokens the model was trained with.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from ..processing import resolve_processor_config
from .common import (
    LLAMA3_8B,
    Checkpoint,
    ConvertError,
    Source,
    checkpoint_source,
    read_optional_json,
    text_config,
    vision_shapes,
)

MODEL_TYPES = ("minicpmv", "llama3v")
VISION_PREFIXES = ("vpm.", "vison.")
PROJECTOR_PREFIXES = ("resampler.", "projection.")
LLM_PREFIX = "llm."

# MiniCPM-Llama3-V 2.5's tower where neither config nor tensor shapes say otherwise
VISION_DEFAULTS = dict(
    num_attention_heads=16,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
VISION_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "layer_norm_eps",
    "hidden_act",
)


def matches(config: dict, keys: List[str]) -> bool:
    if config.get("model_type") in MODEL_TYPES:
        return True
    return any(k.startswith(LLM_PREFIX) for k in keys) and any(
        k.startswith(VISION_PREFIXES) for k in keys
    )


def load(ckpt: Checkpoint) -> Source:
    folder, config, weights = ckpt.folder, ckpt.config, ckpt.weights()
    _check_version(config, weights)
    vis = _prefix(weights, VISION_PREFIXES, "vision")
    proj = _prefix(weights, PROJECTOR_PREFIXES, "projector")
    renames = [(vis, "vision_tower."), (proj, "projector."), (LLM_PREFIX, "language_model.")]
    vision = _vision_config(config, weights, vis)
    text = text_config(config, weights, LLM_PREFIX, published=LLAMA3_8B)
    query = weights.get(proj + "query")
    if query is None:
        raise ConvertError(f"the checkpoint has no resampler queries ({proj}query)")
    queries = int(config.get("query_num", query.shape[0]))
    projector = dict(
        kind="resampler",
        vision_hidden_size=vision["hidden_size"],
        text_hidden_size=text["hidden_size"],
        num_queries=queries,
    )
    processor = _processor_config(folder, config, vision, queries)
    parts = dict(vision=vision, projector=projector, text=text, processor=processor)
    return checkpoint_source(ckpt, "minicpm_v2_5", renames, parts, rename_reserved=False)


def _check_version(config: dict, weights) -> None:
    version = config.get("version", 2.5)
    if str(version) != "2.5" or "llm.model.layers.0.self_attn.q_proj.bias" in weights:
        raise ConvertError(
            f"unknown architecture: MiniCPM-V version {version} (only MiniCPM-Llama3-V 2.5 "
            "and Llama 3-V are supported)"
        )


def _prefix(weights, prefixes, what: str) -> str:
    for p in prefixes:
        if any(k.startswith(p) for k in weights):
            return p
    raise ConvertError(f"the checkpoint has no {what} tensors ({' or '.join(prefixes)})")


def _vision_config(config: dict, weights, prefix: str) -> dict:
    """Shapes, then MiniCPM 2.5 defaults, then whatever config.json declares."""
    declared = config.get("vision_config") or {}
    vision = {**vision_shapes(weights, prefix), **VISION_DEFAULTS}
    vision.update({k: declared[k] for k in VISION_KEYS if k in declared})
    if config.get("drop_vision_last_layer") and "num_hidden_layers" in declared:
        vision["num_hidden_layers"] -= 1  # the checkpoint lacks the dropped layer
    return dict(
        vision, variant="navit", strip_positions=True, navit_coords="arange", feature_layer=None
    )


def _processor_config(folder: Path, config: dict, vision: dict, queries: int) -> dict:
    """Slice settings from preprocessor_config.json, slice_config, then config.json."""
    pre = read_optional_json(folder / "preprocessor_config.json")
    # the published image processor defaults to 64 tokens and version 2.0; never assumed
    if pre.get("image_feature_size", queries) != queries:
        raise ConvertError(
            f"preprocessor_config.json: image_feature_size {pre['image_feature_size']} but the "
            f"resampler has {queries} queries"
        )
    if str(pre.get("version", "2.5")) != "2.5":
        raise ConvertError(
            f"unknown architecture: preprocessor_config.json is for MiniCPM-V version {pre['version']}"
        )
    slices = config.get("slice_config") or {}
    given = {}
    for key, names in (
        (
            "image_size",
            [(pre, "scale_resolution"), (slices, "scale_resolution"), (config, "image_size")],
        ),
        ("max_slices", [(pre, "max_slice_nums"), (slices, "max_slice_nums")]),
        ("slice", [(config, "slice_mode")]),
        ("mean", [(pre, "norm_mean")]),
        ("std", [(pre, "norm_std")]),
        ("image_start", [(pre, "im_start")]),
        ("image_end", [(pre, "im_end")]),
        ("slice_start", [(pre, "slice_start")]),
        ("slice_end", [(pre, "slice_end")]),
        ("image_token", [(pre, "unk")]),
    ):
        for d, name in names:
            if name in d:
                given[key] = d[name]
                break
    given.update(patch_size=vision["patch_size"], tokens_per_tile=queries)
    try:
        return resolve_processor_config(given, "minicpm_v2_5")
    except ValueError as e:
        raise ConvertError(f"processor settings: {e}") from None
