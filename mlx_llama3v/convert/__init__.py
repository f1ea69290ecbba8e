"""Convert Hugging Face checkpoints into this project's MLX format.

Sources: MiniCPM-Llama3-V 2.5 and the released Llama 3-V (``minicpm``), Bunny-Llama-3-8B-V
(``bunny``), or the article's design composed from a SigLIP and a Llama 3 checkpoint
(``compose``). The family is detected from config.json and the tensor names.

Output folder:

- ``config.json``: ``ModelConfig.to_dict()`` (family, vision/projector/text configs,
  image token and its id, processor_config, quantization), so loading re-derives
  nothing from the source; plus the source's ``eos_token_id``.
- ``model.safetensors`` or ``model-0000N-of-0000M.safetensors`` (at most 5 GB each)
  and ``model.safetensors.index.json``, written by mlx-lm's ``save_model``; tensor
  names are the model's (``vision_tower.*``, ``projector.*``, ``language_model.*``).
- ``tokenizer.json``, ``tokenizer_config.json`` (a plain ``PreTrainedTokenizerFast``,
  no remote code), ``special_tokens_map.json`` and ``generation_config.json`` when
  the source has them; ``README.md``, a short model card.

The folder is written under a temporary name next to the target and renamed at the
end, so an interrupted conversion leaves no output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Union

from huggingface_hub import HfApi, ModelCard
from mlx_lm.utils import create_model_card, save_model

from . import bunny, compose, minicpm
from .common import (
    DTYPES,
    Q_BITS,
    Q_GROUP_SIZES,
    Checkpoint,
    ConvertError,
    Source,
    build_model,
    cast,
    check_target,
    copy_if_present,
    quantize_parts,
    read_checkpoint,
    record_checksums,
    staging,
    write_config,
    write_tokenizer,
)

__all__ = ["ConvertError", "convert", "detect_family"]

FAMILIES = {"minicpm": minicpm, "bunny": bunny}


def detect_family(config: dict, keys: List[str]) -> str:
    """``minicpm``, ``bunny``, ``siglip`` or ``llama``; ConvertError if none fits."""
    for name, module in FAMILIES.items():
        if module.matches(config, keys):
            return name
    model_type = config.get("model_type")
    if model_type in ("siglip", "siglip_vision_model"):
        return "siglip"
    if model_type == "llama" or "LlamaForCausalLM" in (config.get("architectures") or []):
        return "llama"
    arch = ", ".join(config.get("architectures") or []) or "none"
    raise ConvertError(
        f"unknown architecture: model_type {model_type!r}, architectures {arch} "
        "(supported: MiniCPM-Llama3-V 2.5 / Llama 3-V, Bunny-Llama-3-V, "
        "or --vision SigLIP + --llm Llama 3)"
    )


def convert(
    hf_path: Optional[str] = None,
    mlx_path: Union[str, Path] = "mlx_model",
    *,
    vision: Optional[str] = None,
    llm: Optional[str] = None,
    dtype: str = "float16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    quantize_vision: bool = False,
    quantize_projector: bool = False,
    projector_layers: int = 2,
    seed: int = 0,
    force: bool = False,
    upload_repo: Optional[str] = None,
    on_weights_written: Optional[Callable[[], None]] = None,
) -> Path:
    """Convert ``hf_path`` (or ``vision`` + ``llm``) into an MLX folder at ``mlx_path``.

    ``on_weights_written`` is called once the weights are in the staging folder (tests
    pause there to interrupt a conversion).
    """
    target = Path(mlx_path).expanduser()
    _check_options(hf_path, vision, llm, dtype, quantize, q_bits, q_group_size)
    check_target(target, force)
    with staging(target, force) as tmp:
        source = _read_source(hf_path, vision, llm, projector_layers, seed)
        tokenizer = write_tokenizer(source, tmp)
        config = source.config
        config.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        model = build_model(source)
        cast(model, dtype)
        if quantize:
            parts = ["language_model"]
            parts += ["vision_tower"] if quantize_vision else []
            parts += ["projector"] if quantize_projector else []
            config.quantization = quantize_parts(model, q_bits, q_group_size, parts)
        save_model(tmp, model, donate_model=True)
        record_checksums(tmp)
        if on_weights_written is not None:
            on_weights_written()
        write_config(config, source.extra_config, tmp)
        copy_if_present(source.tokenizer_dir, tmp, ["generation_config.json"])
        _write_card(tmp, source, target.name)
    if upload_repo:
        _upload(target, upload_repo)
    return target


def _check_options(hf_path, vision, llm, dtype, quantize, q_bits, q_group_size) -> None:
    if hf_path and (vision or llm):
        raise ConvertError("give either --hf-path or --vision with --llm, not both")
    if not hf_path and not (vision and llm):
        raise ConvertError("give --hf-path, or both --vision and --llm")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and q_bits not in Q_BITS:
        raise ConvertError(f"--q-bits must be 4 or 8, got {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ConvertError(f"--q-group-size must be 32, 64 or 128, got {q_group_size}")


def _read_source(hf_path, vision, llm, projector_layers: int, seed: int) -> Source:
    if hf_path:
        ckpt = read_checkpoint(hf_path)
        family = detect_family(ckpt.config, ckpt.keys)
        if family == "siglip":
            raise ConvertError(f"{hf_path} is a SigLIP checkpoint: pass it as --vision, with --llm")
        if family == "llama":
            raise ConvertError(
                f"{hf_path} is a language model alone: pass it as --llm, with --vision"
            )
        return FAMILIES[family].load(ckpt)
    parts: List[Checkpoint] = [read_checkpoint(vision), read_checkpoint(llm)]
    return compose.load(*parts, num_layers=projector_layers, seed=seed)


CARD = """
# {name}

{description}, converted to MLX with mlx-llama3v from {sources}.

```python
from mlx_llama3v.loading import load

model, processor = load("{name}")
inputs = processor([{{"role": "user", "content": "What is in this image?"}}], images=["photo.jpg"])
logits = model(inputs.input_ids[None], tiles=inputs.tiles)
```
"""

DESCRIPTIONS = {
    "minicpm_v2_5": "MiniCPM-Llama3-V 2.5 / Llama 3-V (SigLIP NaViT + resampler + Llama 3)",
    "siglip_llama3": "SigLIP + attention projector (freshly initialised) + Llama 3",
    "bunny": "Bunny-Llama-3-V (SigLIP + mlp2x_gelu + Llama 3)",
}


def _write_card(folder: Path, source: Source, name: str) -> None:
    """mlx-lm's model card with this project's tags and usage."""
    hub = [o for o in source.origin if not Path(o).expanduser().exists()]
    try:
        create_model_card(folder, hub[0] if len(hub) == 1 else None)
    except Exception:  # the source repo may have no card, or the hub be unreachable
        create_model_card(folder, None)
    card = ModelCard.load(folder / "README.md")
    card.data.pipeline_tag = "image-text-to-text"
    card.data.tags = sorted(set(card.data.tags or []) | {"mlx", "mlx-llama3v"})
    if hub:
        card.data.base_model = hub if len(hub) > 1 else hub[0]
    family = source.config.family
    # local sources by folder name only: the card may be uploaded
    sources = ", ".join(
        f"[{o}](https://huggingface.co/{o})" if o in hub else f"`{Path(o).name}`"
        for o in source.origin
    )
    card.text = CARD.format(name=name, description=DESCRIPTIONS[family], sources=sources)
    card.save(folder / "README.md")


def _upload(folder: Path, repo: str) -> None:
    # not mlx-lm's upload_to_hub: it rewrites the card with mlx_lm.load usage,
    # which cannot load this format
    api = HfApi()
    try:
        api.create_repo(repo_id=repo, exist_ok=True)
        api.upload_large_folder(folder_path=str(folder), repo_id=repo, repo_type="model")
    except Exception as e:  # hub errors come in many types
        raise ConvertError(f"{folder} was written but the upload to {repo} failed ({e})") from None
    print(f"Uploaded to https://huggingface.co/{repo}")
