"""Bunny-Llama-3-8B-V: SigLIP-so400m up to its second-to-last layer, mlp2x_gelu, Llama 3.

Keys: ``model.vision_tower.vision_tower.vision_model.*`` (the tower, published with
its last encoder layer already removed), ``model.mm_projector.{0,2}.*``,
``model.{embed_tokens,layers,norm}.*`` and ``lm_head.*``. config.json describes only
the language model and names the tower (``mm_vision_tower``), so the tower's config
comes from its tensor shapes plus SigLIP-so400m's head count, norm and activation.
Features are the output of layer 26 of 27 before ``post_layernorm``
(``feature_layer=-2``). The vocabulary size is read off ``embed_tokens`` (128256 or
128257 depending on the revision).
"""

from __future__ import annotations

import re
from typing import List, Optional

from ..processing import resolve_processor_config
from .common import (
    LLAMA3_8B,
    Checkpoint,
    ConvertError,
    Source,
    checkpoint_source,
    text_config,
    vision_shapes,
)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
PROJECTOR_PREFIX = "model.mm_projector."
RENAMES = [
    (VISION_PREFIX, "vision_tower."),
    (PROJECTOR_PREFIX, "projector.layers."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
SO400M = dict(num_attention_heads=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
SO400M_LAYERS = 27


def matches(config: dict, keys: List[str]) -> bool:
    model_type = str(config.get("model_type", ""))
    arch = config.get("architectures") or []
    return (
        model_type.startswith("bunny")
        or any(str(a).startswith("Bunny") for a in arch)
        or any(k.startswith(PROJECTOR_PREFIX) for k in keys)
    )


def load(ckpt: Checkpoint) -> Source:
    config, weights = ckpt.config, ckpt.weights()
    kind = config.get("mm_projector_type", "mlp2x_gelu")
    if kind != "mlp2x_gelu":
        raise ConvertError(f"unknown architecture: Bunny projector {kind!r} (only mlp2x_gelu)")
    if config.get("use_s2"):
        raise ConvertError("unknown architecture: Bunny with S2 multi-scale features")
    attn = "model.layers.0.self_attn.q_proj."
    if attn + "weight" not in weights or attn + "bias" in weights:  # Phi-3, Qwen2 bases
        raise ConvertError(
            "unknown architecture: only Bunny on Llama 3 (Bunny-Llama-3-8B-V) is supported"
        )
    vision = _vision_config(config, weights)
    text = text_config(config, weights, published=LLAMA3_8B)
    text["vocab_size"] = weights["model.embed_tokens.weight"].shape[0]
    projector = dict(
        kind="mlp2x_gelu",
        vision_hidden_size=vision["hidden_size"],
        text_hidden_size=text["hidden_size"],
    )
    side = vision["image_size"] // vision["patch_size"]
    image_size = _tower_image_size(config.get("mm_vision_tower"), vision["patch_size"], side)
    processor = resolve_processor_config(
        dict(
            image_size=image_size or vision["image_size"],
            patch_size=vision["patch_size"],
            tokens_per_tile=side * side,
        ),
        "bunny",
    )
    parts = dict(vision=vision, projector=projector, text=text, processor=processor)
    return checkpoint_source(ckpt, "bunny", RENAMES, parts, rename_reserved=True)


def _vision_config(config: dict, weights) -> dict:
    """The whole tower's config; layers beyond the feature layer are not built.

    Without a declared layer count, the checkpoint is taken to hold the layers Bunny
    uses (the published one stores 26 of so400m's 27); a full 27-layer tower is
    accepted too.
    """
    shapes = vision_shapes(weights, VISION_PREFIX)
    stored = shapes["num_hidden_layers"]
    declared = config.get("vision_config") or {}
    vision = {**shapes, **SO400M, **declared}
    if "num_hidden_layers" not in declared:
        vision["num_hidden_layers"] = stored if stored == SO400M_LAYERS else stored + 1
    return dict(vision, variant="siglip", strip_positions=False, feature_layer=-2)


def _tower_image_size(name: Optional[str], patch: int, side: int) -> Optional[int]:
    """The input size from a SigLIP repo name such as ``google/siglip-so400m-patch14-384``.

    SigLIP-so400m takes 384 px (27 patches of 14 px plus 6 unused pixels), which the
    position table alone cannot tell from 378; the name is trusted only when it
    agrees with the tensors.
    """
    m = re.search(r"patch(\d+)-(\d+)$", str(name or ""))
    if m and int(m.group(1)) == patch and int(m.group(2)) // patch == side:
        return int(m.group(2))
    return None
