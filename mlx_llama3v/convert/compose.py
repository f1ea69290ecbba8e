"""The article's design assembled from parts: SigLIP + a new attention projector + Llama 3.

``--vision`` is a SigLIP checkpoint: a full ``SiglipModel`` (model_type "siglip",
``vision_config`` nested; keys ``vision_model.*`` and ``text_model.*``) whose text
tower, logit scale/bias and pooling head are dropped, or a ``SiglipVisionModel``.
``--llm`` is a ``LlamaForCausalLM`` (Llama 3, or 3.1 with its rope scaling). The
projector is new, initialised by ``init_projector`` from a seed; stage-1 training
trains it. Missing image/text tokens are made from Llama 3's reserved tokens.
"""

from __future__ import annotations

import math
from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten

from ..config import ProjectorConfig
from ..models.projector import build_projector
from ..processing import resolve_processor_config
from .common import Checkpoint, ConvertError, Source, eos_config, make_config, rename, text_config

VISION_RENAMES = [("vision_model.", "vision_tower.")]
LLM_RENAMES = [("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")]
# transformers' SiglipVisionConfig defaults: its config.json only lists what differs
SIGLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)
INIT_STD = 0.02


def load(vision: Checkpoint, llm: Checkpoint, num_layers: int = 2, seed: int = 0) -> Source:
    vision_cfg = _vision_config(vision)
    _check_llama(llm)
    llm_weights = llm.weights()
    text = text_config(llm.config, llm_weights)
    projector = ProjectorConfig(
        kind="attention",
        vision_hidden_size=vision_cfg["hidden_size"],
        text_hidden_size=text["hidden_size"],
        num_layers=num_layers,
        num_attention_heads=vision_cfg["num_attention_heads"],
        intermediate_size=vision_cfg["intermediate_size"],
        layer_norm_eps=vision_cfg["layer_norm_eps"],
        hidden_act=vision_cfg["hidden_act"],
    )
    embed = llm_weights.get("model.embed_tokens.weight")
    if embed is None:
        raise ConvertError(f"{llm.origin}: no model.embed_tokens.weight (not a Llama checkpoint?)")
    side = vision_cfg["image_size"] // vision_cfg["patch_size"]
    processor = resolve_processor_config(
        dict(
            image_size=vision_cfg["image_size"],
            patch_size=vision_cfg["patch_size"],
            tokens_per_tile=side * side,
        ),
        "siglip_llama3",
    )
    config = make_config(
        family="siglip_llama3",
        vision_config=vision_cfg,
        projector_config=projector,
        text_config=text,
        image_token=processor["image_token"],
        processor_config=processor,
    )
    fresh = init_projector(projector, seed, _rms(embed))
    weights = {
        **rename(_vision_weights(vision), VISION_RENAMES),
        **rename(llm_weights, LLM_RENAMES),
        **{"projector." + k: v for k, v in fresh.items()},
    }
    return Source(
        config=config,
        weights=weights,
        tokenizer_dir=llm.folder,
        rename_reserved=True,
        origin=[vision.origin, llm.origin],
        renames=VISION_RENAMES + LLM_RENAMES,
        extra_config=eos_config(llm.config),
    )


def init_projector(config: ProjectorConfig, seed: int, embed_rms: float) -> Dict[str, mx.array]:
    """Fresh projector weights, reproducible from ``seed``.

    - Linear weights: truncated normal (cut at 2 sigma), sigma 0.02; biases zero.
    - LayerNorms: weight one, bias zero.
    - The projections that write into the residual stream (``self_attn.out_proj``,
      ``mlp.fc2``) use sigma 0.02 / sqrt(2 * layers) (GPT-2), so each block starts
      close to the identity.
    - The final ``proj`` uses sigma rms(LM embeddings) / sqrt(vision width): its
      LayerNorm-ed inputs have unit variance, so image tokens start at the scale
      of the language model's text embeddings.
    """
    params = sorted(tree_flatten(build_projector(config).parameters()))
    keys = mx.random.split(mx.random.key(seed), len(params))
    out = {}
    for key, (name, p) in zip(keys, params):
        leaf = name.rsplit(".", 1)[-1]
        if "layer_norm" in name or name.startswith("norm."):
            out[name] = mx.ones(p.shape) if leaf == "weight" else mx.zeros(p.shape)
        elif leaf == "bias":
            out[name] = mx.zeros(p.shape)
        else:
            std = INIT_STD
            if name.endswith(("self_attn.out_proj.weight", "mlp.fc2.weight")):
                std /= math.sqrt(2 * config.num_layers)
            elif name == "proj.weight":
                std = embed_rms / math.sqrt(config.vision_hidden_size)
            out[name] = std * mx.random.truncated_normal(-2.0, 2.0, p.shape, key=key)
    return out


def _vision_config(vision: Checkpoint) -> dict:
    model_type = vision.config.get("model_type")
    if model_type == "siglip":
        declared = vision.config.get("vision_config") or {}
    elif model_type == "siglip_vision_model":
        declared = vision.config
    else:
        raise ConvertError(
            f"unknown architecture: --vision {vision.origin} has model_type {model_type!r} "
            "(a SigLIP checkpoint is expected)"
        )
    cfg = {
        **SIGLIP_VISION_DEFAULTS,
        **{k: declared[k] for k in SIGLIP_VISION_DEFAULTS if k in declared},
    }
    return dict(cfg, variant="siglip", strip_positions=False, feature_layer=None)


def _vision_weights(vision: Checkpoint) -> Dict[str, mx.array]:
    """The tower's tensors under ``vision_model.`` (a ``SiglipVisionModel`` saved by
    transformers >= 5 has no prefix)."""
    weights = vision.weights()
    if any(k.startswith("vision_model.") for k in weights):
        return weights
    return {"vision_model." + k: v for k, v in weights.items()}


def _check_llama(llm: Checkpoint) -> None:
    arch = llm.config.get("architectures") or []
    if llm.config.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise ConvertError(
            f"unknown architecture: --llm {llm.origin} has model_type "
            f"{llm.config.get('model_type')!r} (a Llama 3 checkpoint is expected)"
        )


def _rms(x: mx.array) -> float:
    return math.sqrt(float(mx.mean(mx.square(x.astype(mx.float32)))))
