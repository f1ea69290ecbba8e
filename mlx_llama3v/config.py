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
NAVIT_COORDS = ("arange", "clamp")  # see models/vision.py


# Llama fields that change the arithmetic: taken from the source, from a family's
# published values, or an error; never from a generic default.
ARITHMETIC_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "rope_theta",
    "tie_word_embeddings",
)
# rope scaling types mlx-lm's Llama implements, with the fields each one needs
ROPE_SCALING_FIELDS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def normalize_text_config(
    config: Dict[str, Any],
    *,
    derived: Optional[Dict[str, Any]] = None,
    published: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A Llama ``config.json`` dict in the one form mlx-lm's Llama reads.

    Reads every schema transformers has written: top-level ``rope_theta`` with
    ``rope_scaling`` (keyed ``type`` or ``rope_type``; null for none), and
    transformers >= 5's ``rope_parameters`` (``rope_theta``, ``rope_type`` and, for
    ``llama3``, its scaling fields). The result has a top-level ``rope_theta`` and a
    ``rope_scaling`` keyed ``rope_type`` (absent for plain rope). Two schemas in one
    file that disagree are an error.

    Each of ``ARITHMETIC_FIELDS`` the source lacks comes from ``derived`` (what the
    source's tensors say), then ``published`` (the family's published values), or
    it is a ``ValueError`` naming the fields. The result is a fixed point: normalising
    it again changes nothing.
    """
    out = dict(config)
    out.setdefault("model_type", "llama")
    theta, scaling = _rope_settings(out)
    if theta is not None:
        out["rope_theta"] = float(theta)
    if scaling is not None:
        out["rope_scaling"] = scaling
    for source in (derived or {}, published or {}):
        for k in ARITHMETIC_FIELDS:
            if out.get(k) is None and source.get(k) is not None:
                out[k] = source[k]
    missing = [k for k in ARITHMETIC_FIELDS if out.get(k) is None]
    if missing:
        raise ValueError(
            f"no {', '.join(missing)} given (a value that changes the result is never "
            "guessed; add it to config.json)"
        )
    act = out.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"the language model uses hidden_act {act!r}; Llama uses 'silu'")
    return out


def _rope_settings(config: Dict[str, Any]):
    """(rope_theta or None, rope_scaling or None), popped from ``config``, both schemas."""
    thetas, scalings = [], []
    if config.get("rope_theta") is not None:
        thetas.append(("rope_theta", config["rope_theta"]))
    config.pop("rope_theta", None)
    for where in ("rope_scaling", "rope_parameters"):
        given = config.pop(where, None)
        if given is None:
            continue
        if not isinstance(given, dict) or any(isinstance(v, dict) for v in given.values()):
            raise ValueError(f"{where}: expected one dict of rope settings, got {given!r}")
        given = dict(given)
        if given.get("rope_theta") is not None:
            thetas.append((f"{where}' rope_theta", given["rope_theta"]))
        given.pop("rope_theta", None)
        scalings.append((where, _rope_scaling(given, where)))
    if len({float(v) for _, v in thetas}) > 1:
        raise ValueError(" and ".join(f"{k} {v}" for k, v in thetas) + " disagree")
    given = [v for _, v in scalings if v is not None]
    if len(scalings) > 1 and any(v != scalings[0][1] for _, v in scalings):
        raise ValueError("rope_scaling and rope_parameters give different rope scaling")
    return (thetas[0][1] if thetas else None), (given[0] if given else None)


def _rope_scaling(scaling, where: str):
    """A rope scaling dict keyed ``rope_type``, or None for plain rope."""
    kinds = {scaling.pop(k) for k in ("type", "rope_type") if k in scaling}
    if len(kinds) > 1:
        raise ValueError(f"{where}: type and rope_type disagree ({' vs '.join(sorted(kinds))})")
    kind = kinds.pop() if kinds else "default"
    if kind == "default":
        return None
    if kind not in ROPE_SCALING_FIELDS:
        raise ValueError(
            f"{where}: rope type {kind!r} is not supported "
            f"({', '.join(['default', *ROPE_SCALING_FIELDS])})"
        )
    lacking = [k for k in ROPE_SCALING_FIELDS[kind] if scaling.get(k) is None]
    if lacking:
        raise ValueError(f"{where}: {kind} rope scaling lacks {', '.join(lacking)}")
    return {"rope_type": kind, **scaling}


@dataclass
class VisionConfig(BaseModelArgs):
    """A SigLIP vision tower.

    ``variant`` "siglip" is the fixed-resolution ``SiglipVisionModel`` (learned
    position table indexed 0..N-1); "navit" is ``Idefics2VisionTransformer``
    (variable tile sizes, bucketized position ids). ``strip_positions`` reproduces
    MiniCPM-Llama3-V 2.5, which feeds every tile as a one-patch-high strip.
    ``navit_coords`` is how NaViT fractional coordinates are computed: "arange"
    (transformers 4.40, what MiniCPM-Llama3-V 2.5 was trained with) or "clamp"
    (today's transformers); unset, "arange" for the strip layout, else "clamp".

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
    navit_coords: Optional[str] = None
    feature_layer: Optional[int] = None

    def __post_init__(self):
        if self.variant not in ("siglip", "navit"):
            raise ValueError(f"unknown vision variant {self.variant!r} (siglip or navit)")
        if self.navit_coords is None:
            self.navit_coords = "arange" if self.strip_positions else "clamp"
        if self.navit_coords not in NAVIT_COORDS:
            raise ValueError(
                f"unknown navit_coords {self.navit_coords!r} (one of {', '.join(NAVIT_COORDS)})"
            )
        n = self.num_hidden_layers
        if self.feature_layer is not None and not -(n + 1) <= self.feature_layer <= n:
            raise ValueError(f"feature_layer {self.feature_layer} is outside hidden_states[0..{n}]")

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
        out["text_config"] = {k: v for k, v in asdict(self.text_config).items() if v is not None}
        return out
