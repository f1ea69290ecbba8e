"""Tiny random Hugging Face checkpoints of every source family, in their real on-disk layout.

Each factory writes a folder the way the published repository has it (key names,
config.json fields, sharded safetensors with ``model.safetensors.index.json``,
tokenizer files) at tiny sizes, and returns a ``TinyCheckpoint`` holding the
PyTorch parts it was written from, which run the published pipeline as the numerical
reference (transformers' towers and Llama, and the reference resampler/projectors of
``references``). Nothing is downloaded.

- ``make_minicpm(dir)``: MiniCPM-Llama3-V 2.5 (``vpm.``, ``resampler.``, ``llm.``), its
  config.json with ``vision_config``/``slice_config``, ``preprocessor_config.json`` and
  a remote-code tokenizer config.
- ``make_minicpm(dir, variant="llama3v")``: the released Llama 3-V (``vison.``,
  ``projection.``), whose config.json lacks the vision and slice settings.
- ``make_bunny(dir)``: Bunny-Llama-3-8B-V, tower stored without its last layer.
- ``make_siglip(dir)`` + ``make_llama(dir)``: a full ``SiglipModel`` (with its text
  tower) and a Llama 3.1 (rope scaling) for composing.

Every factory with a language model takes ``schema``: "4" writes its Llama fields as
transformers 4.x did (top-level ``rope_theta`` and ``rope_scaling``), "5" as
transformers >= 5 does (``rope_parameters`` holding ``rope_theta``, ``rope_type`` and
the llama3 scaling fields; no top-level ``rope_theta``); and ``rope_scaling`` (None
or a llama3 scaling dict such as ``ROPE_31``), which the PyTorch reference uses too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from references import (
    LLAMA31_ROPE,
    NAVIT,
    SIGLIP,
    TEXT,
    TorchAttentionProjector,
    TorchMLPProjector,
    TorchResampler,
    hf_llama,
    hf_navit,
    hf_siglip,
    randomize,
    strip_nchw,
    with_440_positions,
)
from tiny_tokenizer import (
    BASE_VOCAB,
    MINICPM_RENAMES,
    NUM_SPECIAL,
    make_llama3_tokenizer,
    special_id,
)

VOCAB = BASE_VOCAB + NUM_SPECIAL
LLM = dict(TEXT, vocab_size=VOCAB)
QUERIES = 8
BOS, EOS, EOT = (
    special_id("<|begin_of_text|>"),
    special_id("<|end_of_text|>"),
    special_id("<|eot_id|>"),
)
MINICPM_TOKENIZER_CONFIG = {
    "tokenizer_class": "MiniCPMVTokenizerFast",
    "auto_map": {"AutoTokenizer": ["tokenization_minicpmv_fast.MiniCPMVTokenizerFast", None]},
}
REMOTE_CODE = 'raise RuntimeError("remote code must never run")\n'
# Llama 3.1's rope scaling as its config.json has it (a copy: transformers edits the dict
# it is given)
ROPE_31 = {
    k: LLAMA31_ROPE[k]
    for k in (
        "rope_type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
    )
}


@dataclass
class TinyCheckpoint:
    """A written checkpoint and the PyTorch parts that compute its published pipeline."""

    path: Path
    family: str
    vision: torch.nn.Module
    llm: torch.nn.Module
    projector: Optional[torch.nn.Module] = None
    patch_size: int = 4
    extra: Dict = field(default_factory=dict)

    @torch.no_grad()
    def features(self, tiles: List[np.ndarray]) -> List[torch.Tensor]:
        """One (tokens, LM width) tensor per channels-last tile."""
        p = self.patch_size
        if self.family == "minicpm_v2_5":
            x, mask = strip_nchw(tiles, p)
            hidden = self.vision(pixel_values=x, patch_attention_mask=mask).last_hidden_state
            grids = [(t.shape[0] // p, t.shape[1] // p) for t in tiles]
            return list(self.projector(hidden, grids))
        x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2)
        if self.family == "bunny":  # Bunny: the truncated tower's last hidden state
            hidden = self.vision(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        else:
            hidden = self.vision.vision_model(pixel_values=x).last_hidden_state
        return list(self.projector(hidden))

    @torch.no_grad()
    def logits(self, input_ids, tiles, image_token_id: int) -> torch.Tensor:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64).reshape(1, -1))
        embeds = self.llm.get_input_embeddings()(ids)
        if tiles:
            embeds[ids == image_token_id] = torch.cat(self.features(tiles))
        return self.llm(inputs_embeds=embeds).logits


# ------------------------------------------------------------------ writing
def write_safetensors(directory: Path, tensors: Dict[str, torch.Tensor], shards: int = 1) -> None:
    """As transformers saves: one ``model.safetensors``, or N shards plus an index."""
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    weight_map = {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in group}, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in group})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / "model.safetensors.index.json", index)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def prefixed(module: torch.nn.Module, prefix: str) -> Dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


SCHEMAS = ("4", "5")


def llama_fields(text: dict, rope_scaling=None, schema: str = "4") -> dict:
    """The Llama fields of a config.json as transformers 4.40 ("4") or 5.x ("5") writes them."""
    if schema not in SCHEMAS:
        raise ValueError(f"schema {schema!r}")
    fields = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "hidden_act": "silu",
        "hidden_size": text["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": text["intermediate_size"],
        "max_position_embeddings": text["max_position_embeddings"],
        "num_attention_heads": text["num_attention_heads"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_key_value_heads": text["num_key_value_heads"],
        "pretraining_tp": 1,
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_scaling": rope_scaling,
        "rope_theta": text["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.40.0",
        "use_cache": True,
        "vocab_size": text["vocab_size"],
    }
    if schema == "5":
        del fields["rope_theta"], fields["rope_scaling"]
        scaling = dict(rope_scaling) if rope_scaling else {"rope_type": "default"}
        fields.update(
            rope_parameters={**scaling, "rope_theta": text["rope_theta"]},
            transformers_version="5.0.0",
            dtype=fields.pop("torch_dtype"),
        )
    return fields


def _copy(rope_scaling):
    # transformers edits the rope dict it is given
    return dict(rope_scaling) if rope_scaling else None


# ------------------------------------------------------------------ families
def make_minicpm(
    directory, variant: str = "minicpm", seed: int = 0, schema: str = "4", rope_scaling=None
) -> TinyCheckpoint:
    """MiniCPM-Llama3-V 2.5 (``variant="minicpm"``) or the released Llama 3-V ("llama3v")."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    llama3v = variant == "llama3v"
    # Llama 3-V's config has no vision_config: the converter assumes MiniCPM's 16 heads
    vision_cfg = dict(NAVIT, num_attention_heads=16 if llama3v else 4)
    # the published model runs transformers 4.40's position ids (pinned by its model card)
    vision = with_440_positions(hf_navit(vision_cfg, seed=seed))
    projector = randomize(
        TorchResampler(QUERIES, LLM["hidden_size"], vision_cfg["hidden_size"]), seed=seed + 1
    )
    llm, _ = hf_llama(LLM, rope_scaling=_copy(rope_scaling), seed=seed + 2)
    vis, proj = ("vison.", "projection.") if llama3v else ("vpm.", "resampler.")
    tensors = {**prefixed(vision, vis), **prefixed(projector, proj), **prefixed(llm, "llm.")}
    write_safetensors(directory, tensors, shards=3)
    config = {
        **llama_fields(LLM, rope_scaling, schema),
        "image_size": 16,  # the slicing scale resolution (448 in the released model)
        "patch_size": vision_cfg["patch_size"],
        "query_num": QUERIES,
        "slice_mode": True,
    }
    if llama3v:
        config.update(
            _name_or_path="mustafaaljadery/llama3v",
            model_type="llama3v",
            mm_use_im_start_end=True,
            auto_map={
                "AutoConfig": "config.Config",
                "AutoModel": "modeling_llama3v.Llama3v",
                "AutoModelForCausalLM": "modeling_llama3v.Llama3v",
            },
        )
    else:
        config.update(
            _name_or_path="openbmb/MiniCPM-Llama3-V-2_5",
            architectures=["MiniCPMV"],
            model_type="minicpmv",
            version=2.5,
            batch_vision_input=True,
            drop_vision_last_layer=False,
            auto_map={
                "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
                "AutoModel": "modeling_minicpmv.MiniCPMV",
                "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
            },
            slice_config={
                "max_slice_nums": 9,
                "model_type": "minicpmv",
                "patch_size": vision_cfg["patch_size"],
            },
            vision_config={
                k: vision_cfg[k]
                for k in (
                    "hidden_size",
                    "image_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_hidden_layers",
                    "patch_size",
                )
            }
            | {"model_type": "idefics2"},
        )
        write_json(
            directory / "preprocessor_config.json",
            {
                "image_processor_type": "MiniCPMVImageProcessor",
                "max_slice_nums": 9,
                "scale_resolution": 16,
                "patch_size": vision_cfg["patch_size"],
                "image_feature_size": QUERIES,
                "norm_mean": [0.5, 0.5, 0.5],
                "norm_std": [0.5, 0.5, 0.5],
                "version": 2.5,
            },
        )
    write_json(directory / "config.json", config)
    make_llama3_tokenizer(
        directory, extra=MINICPM_RENAMES, config_overrides=MINICPM_TOKENIZER_CONFIG
    )
    (directory / "tokenization_minicpmv_fast.py").write_text(REMOTE_CODE)
    return TinyCheckpoint(
        directory, "minicpm_v2_5", vision, llm, projector, vision_cfg["patch_size"]
    )


def make_bunny(directory, seed: int = 0, schema: str = "4", rope_scaling=None) -> TinyCheckpoint:
    """Bunny-Llama-3-8B-V: the tower without its last layer, vocab read off embed_tokens."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # no vision config in Bunny's config.json: the converter assumes so400m's 16 heads
    vision = hf_siglip(dict(SIGLIP, num_attention_heads=16), seed=seed)
    tower = getattr(vision, "vision_model", vision)  # transformers 5 drops that level
    del tower.encoder.layers[-1]  # what Bunny's tower does on load
    tower.head = torch.nn.Identity()
    projector = randomize(
        TorchMLPProjector(SIGLIP["hidden_size"], LLM["hidden_size"]), seed=seed + 1
    )
    # the 128257 revision
    llm, _ = hf_llama(
        dict(LLM, vocab_size=VOCAB + 1), rope_scaling=_copy(rope_scaling), seed=seed + 2
    )
    tensors = {
        **{
            "model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
            for k, v in vision.state_dict().items()
        },
        **{
            "model.mm_projector." + k.split(".", 1)[1]: v for k, v in projector.state_dict().items()
        },
        **prefixed(llm, ""),
    }
    write_safetensors(directory, tensors, shards=2)
    config = {
        **llama_fields(LLM, rope_scaling, schema),  # vocab_size 640: embeddings have one more row
        "_name_or_path": "BAAI/Bunny-Llama-3-8B-V",
        "architectures": ["BunnyLlamaForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_bunny_llama.BunnyLlamaConfig",
            "AutoModelForCausalLM": "modeling_bunny_llama.BunnyLlamaForCausalLM",
        },
        "model_type": "bunny-llama",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": SIGLIP["hidden_size"],
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_vision_tower": False,
        "use_mm_proj": True,
        "use_s2": False,
    }
    write_json(directory / "config.json", config)
    make_llama3_tokenizer(directory, extra=())
    return TinyCheckpoint(directory, "bunny", vision, llm, projector, SIGLIP["patch_size"])


def make_siglip(directory, seed: int = 0):
    """A full SiglipModel (vision + text towers) as google/siglip-so400m-patch14-384 ships it."""
    from transformers import SiglipConfig, SiglipModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=1,
    )
    cfg = SiglipConfig(text_config=text, vision_config=SIGLIP)
    cfg.vision_config._attn_implementation = cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = randomize(SiglipModel(cfg), seed)
    write_safetensors(directory, model.state_dict(), shards=1)
    vision_keys = (
        "hidden_size",
        "image_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "patch_size",
    )
    write_json(
        directory / "config.json",
        {
            "architectures": ["SiglipModel"],
            "initializer_factor": 1.0,
            "model_type": "siglip",
            "text_config": dict(text, model_type="siglip_text_model"),
            "torch_dtype": "float32",
            "transformers_version": "4.37.0.dev0",
            "vision_config": {
                **{k: SIGLIP[k] for k in vision_keys},
                "model_type": "siglip_vision_model",
            },
        },
    )
    return directory, model


def make_llama(directory, seed: int = 0, rope_scaling=ROPE_31, schema: str = "4"):
    """A Llama 3.1-style LlamaForCausalLM with a plain Llama 3 tokenizer."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    llm, _ = hf_llama(LLM, rope_scaling=_copy(rope_scaling), seed=seed)
    write_safetensors(directory, llm.state_dict(), shards=2)
    config = {
        **llama_fields(LLM, rope_scaling, schema),
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "eos_token_id": [EOS, EOT],
    }
    write_json(directory / "config.json", config)
    write_json(
        directory / "generation_config.json", {"bos_token_id": BOS, "eos_token_id": [EOS, EOT]}
    )
    make_llama3_tokenizer(directory, extra=(), eos_token="<|eot_id|>")
    return directory, llm


def make_composed(
    directory, seed: int = 0, schema: str = "4", rope_scaling=ROPE_31
) -> TinyCheckpoint:
    """The two parts to compose; the projector is set once the conversion made it."""
    directory = Path(directory)
    vision_dir, siglip = make_siglip(directory / "siglip", seed)
    llm_dir, llm = make_llama(directory / "llama", seed + 2, rope_scaling, schema)
    return TinyCheckpoint(
        directory,
        "siglip_llama3",
        siglip,
        llm,
        None,
        SIGLIP["patch_size"],
        extra={"vision": vision_dir, "llm": llm_dir},
    )


def attention_projector_from(weights: Dict[str, np.ndarray], layers: int = 2) -> torch.nn.Module:
    """The reference projector loaded with a converted model's ``projector.*`` weights."""
    ref = TorchAttentionProjector(
        SIGLIP["hidden_size"],
        SIGLIP["num_attention_heads"],
        SIGLIP["intermediate_size"],
        LLM["hidden_size"],
        layers,
    )
    state = {
        k[len("projector.") :]: torch.from_numpy(np.asarray(v, dtype=np.float32))
        for k, v in weights.items()
        if k.startswith("projector.")
    }
    ref.load_state_dict(state, strict=True)
    return ref.eval()
