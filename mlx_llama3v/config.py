"""Model configuration: one dataclass per part, plus the whole model's.

The configs follow mlx-lm's ``BaseModelArgs`` idiom: ``from_dict`` ignores keys a
dataclass does not know, so Hugging Face ``config.json`` fragments can be passed in
as they are. The family differences (MiniCPM-Llama3-V 2.5, the article's SigLIP +
attention projector design, Bunny) are expressed here, not in forks of the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.llama import ModelArgs as TextConfig

FAMILIES = ("minicpm_v2_5", "siglip_llama3", "bunny")
PROJECTOR_KINDS = ("resampler", "attention", "mlp2x_gelu")


def normalize_text_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A Llama ``config.json`` dict in the form mlx-lm's Llama reads.

    transformers >= 5 writes ``rope_parameters`` (with ``rope_theta`` inside) where
    older checkpoints have ``rope_theta`` and ``rope_scaling``; accept both.
    """
    config = dict(config)
    config.setdefault("model_type", "llama")
    rope = config.pop("rope_parameters", None)
    if rope:
        rope = dict(rope)
        config.setdefault("rope_theta", rope.pop("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            config.setdefault("rope_scaling", rope)
    if config.get("rope_scaling") is None:
        config.pop("rope_scaling", None)
    return config


@dataclass
class VisionConfig(BaseModelArgs):
    """A SigLIP vision tower.

    ``variant`` "siglip" is the fixed-resolution ``SiglipVisionModel`` (learned
    position table indexed 0..N-1); "navit" is ``Idefics2VisionTransformer``
    (variable tile sizes, bucketized position ids). ``strip_positions`` reproduces
    MiniCPM-Llama3-V 2.5, which feeds every tile as a one-patch-high strip.

    ``feature_layer`` None takes ``last_hidden_state`` (after ``post_layernorm``);
    an int k takes transformers' ``hidden_states[k]`` (before ``post_layernorm``,
    negative values count from the end as in Python). Layers after it are not built.
    """

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"
    variant: str = "siglip"
    strip_positions: bool = False
    feature_layer: Optional[int] = None

    def __post_init__(self):
        if self.variant not in ("siglip", "navit"):
            raise ValueError(f"unknown vision variant {self.variant!r} (siglip or navit)")
        n = self.num_hidden_layers
        if self.feature_layer is not None and not -(n + 1) <= self.feature_layer <= n:
            raise ValueError(
                f"feature_layer {self.feature_layer} is outside hidden_states[0..{n}]"
            )

    @property
    def num_patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_layers_used(self) -> int:
        """How many encoder layers the chosen feature needs."""
        if self.feature_layer is None:
            return self.num_hidden_layers
        return self.feature_layer % (self.num_hidden_layers + 1)

    @property
    def use_post_layernorm(self) -> bool:
        return self.feature_layer is None


@dataclass
class ProjectorConfig(BaseModelArgs):
    """Maps vision features into the language model's embedding space.

    - ``resampler``: MiniCPM's cross-attention resampler; ``num_queries`` learned
      queries, ``text_hidden_size // 128`` heads; every tile becomes ``num_queries``
      tokens.
    - ``attention``: the article's design: ``num_layers`` pre-LayerNorm transformer
      blocks (self-attention + MLP) over the vision tokens at ``hidden_size`` width,
      a final LayerNorm, then a linear map to the LM width. Token count unchanged.
    - ``mlp2x_gelu``: Linear, GELU (exact erf), Linear. Token count unchanged.
    """

    kind: str = "resampler"
    vision_hidden_size: int = 1152
    text_hidden_size: int = 4096
    num_queries: int = 96
    max_grid_size: int = 70
    num_layers: int = 2
    num_attention_heads: int = 16
    intermediate_size: int = 4304
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if self.kind not in PROJECTOR_KINDS:
            raise ValueError(
                f"unknown projector kind {self.kind!r} (one of {', '.join(PROJECTOR_KINDS)})"
            )

    @property
    def resampler_heads(self) -> int:
        return self.text_hidden_size // 128


@dataclass
class ModelConfig(BaseModelArgs):
    """The whole model: vision tower + projector + mlx-lm Llama, and how they meet.

    ``image_token`` is the placeholder whose embeddings are replaced, in order, by
    the projected image features (``<unk>`` for MiniCPM; its id is looked up in
    the tokenizer by content and stored as ``image_token_id``).
    """

    family: str = "siglip_llama3"
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    projector_config: ProjectorConfig = field(default_factory=ProjectorConfig)
    text_config: TextConfig = None
    image_token: str = "<unk>"
    image_token_id: int = 0
    model_type: str = "llama3v"
    processor_config: Dict[str, Any] = field(default_factory=dict)
    quantization: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r} (one of {', '.join(FAMILIES)})")
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        if isinstance(self.projector_config, dict):
            self.projector_config = ProjectorConfig.from_dict(self.projector_config)
        if isinstance(self.text_config, dict):
            self.text_config = TextConfig.from_dict(normalize_text_config(self.text_config))
        if self.text_config is None:
            raise ValueError("text_config is required")
        proj, vis, text = self.projector_config, self.vision_config, self.text_config
        if proj.vision_hidden_size != vis.hidden_size:
            raise ValueError(
                f"projector expects vision width {proj.vision_hidden_size}, "
                f"vision tower has {vis.hidden_size}"
            )
        if proj.text_hidden_size != text.hidden_size:
            raise ValueError(
                f"projector maps to width {proj.text_hidden_size}, "
                f"language model has {text.hidden_size}"
            )

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["text_config"] = {
            k: v for k, v in asdict(self.text_config).items() if v is not None
        }
        return out
