"""Load a converted model and its processor: ``model, processor = load(path_or_repo)``.

A converted folder (config.json with a ``family``) loads as it is: quantized layers
are rebuilt where the weights carry ``.scales`` (as mlx-lm's loader does) and the
weights are loaded strictly, with no ``sanitize``: no tensor may be missing or left
over. A Hugging Face checkpoint (folder or repo id) is converted first, in float16,
into a cache folder (``$MLX_LLAMA3V_CACHE`` or ``~/.cache/mlx_llama3v``) and loaded
from there; later calls reuse the cached conversion.

The processor is the tokenizer (``PreTrainedTokenizerFast``; remote code is never
run) with the ``processor_config`` saved in config.json. ``adapter_path`` applies
a fine-tuning run's output: mlx-lm LoRA adapters for the language model and/or
projector weights (``apply_adapter_folder``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import _download, infer_quant_config, load_config
from transformers import PreTrainedTokenizerFast

from . import convert as converter
from .config import FAMILIES, ModelConfig
from .models.llama3v import Model
from .processing import PromptInputs, build_prompt

CACHE_ENV = "MLX_LLAMA3V_CACHE"


@dataclass
class Processor:
    """Turns conversations with images into model input (``processing.build_prompt``)."""

    tokenizer: Any
    config: Dict[str, Any]

    def __call__(
        self,
        messages: Sequence[Dict[str, Any]],
        images: Optional[Sequence[Any]] = None,
        add_generation_prompt: bool = True,
    ) -> PromptInputs:
        return build_prompt(messages, self.tokenizer, self.config, images, add_generation_prompt)


def load(
    path_or_repo: str, adapter_path: Optional[str] = None, *, lazy: bool = False
) -> Tuple[Model, Processor]:
    """The model and processor of a converted folder, or of a checkpoint converted on the fly.

    ``adapter_path``: a fine-tuning run's adapters (see ``apply_adapter_folder``).
    """
    model, processor = load_converted(converted_folder(path_or_repo), lazy=lazy)
    if adapter_path is not None:
        apply_adapter_folder(model, adapter_path)
    return model, processor


ADAPTER_CONFIG = "adapter_config.json"
ADAPTERS = "adapters.safetensors"
PROJECTOR = "projector.safetensors"


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or does not fit the model (one line)."""


def apply_adapter_folder(model: Model, adapter_path) -> Model:
    """Apply what a fine-tuning run saved: language-model adapters and/or a projector.

    ``adapter_config.json`` + ``adapters.safetensors``: see ``load_adapters``;
    ``projector.safetensors``: projector weights (names relative to ``model.projector``),
    loaded strictly.
    """
    folder = Path(adapter_path).expanduser()
    has_adapters = (folder / ADAPTER_CONFIG).is_file()
    has_projector = (folder / PROJECTOR).is_file()
    if not (has_adapters or has_projector):
        where = "adapter folder not found" if not folder.is_dir() else "not an adapter folder"
        raise AdapterError(
            f"{adapter_path}: {where} (expected {ADAPTER_CONFIG} + {ADAPTERS} and/or {PROJECTOR})"
        )
    if has_adapters:
        load_adapters(model, folder)
    if has_projector:
        try:
            model.projector.load_weights(
                list(mx.load(str(folder / PROJECTOR)).items()), strict=True
            )
        except (ValueError, RuntimeError) as e:
            raise AdapterError(
                f"{folder / PROJECTOR} does not fit the model's projector: {_adapter_problem(e)}"
            ) from None
    model.eval()
    return model


def load_adapters(model: Model, adapter_path) -> Model:
    """Apply mlx-lm adapters to ``model.language_model``, in place.

    The folder is mlx-lm's (``mlx_lm.lora`` and ``mlx_llama3v.train`` write it):
    ``adapter_config.json`` with ``fine_tune_type`` ("lora", "dora" or "full"),
    ``num_layers`` (the last N decoder layers) and ``lora_parameters`` (``rank``,
    ``scale``, ``dropout``, optional ``keys`` such as ``["self_attn.q_proj"]``), and
    ``adapters.safetensors`` whose tensor names are relative to the language model
    (``model.layers.31.self_attn.q_proj.lora_a``).
    """
    folder = Path(adapter_path).expanduser()
    for name in (ADAPTER_CONFIG, ADAPTERS):
        if not (folder / name).is_file():
            where = "adapter folder not found" if not folder.is_dir() else f"no {name} in it"
            raise AdapterError(
                f"{adapter_path}: {where} (an mlx-lm adapter folder has {ADAPTER_CONFIG} "
                f"and {ADAPTERS})"
            )
    from mlx_lm.tuner.utils import load_adapters as mlx_lm_load_adapters

    try:
        mlx_lm_load_adapters(model.language_model, str(folder))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterError(
            f"adapter {adapter_path} does not fit the model: {_adapter_problem(e)}"
        ) from None
    model.eval()  # the new LoRA layers' dropout off
    return model


def _adapter_problem(e: BaseException) -> str:
    """The first problem mlx-lm lists, and how many more there are, on one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if isinstance(e, KeyError):
        return f"adapter_config.json lacks {lines[0] if lines else e!r}"
    if len(lines) > 1 and lines[0].endswith(":"):  # "... incompatible tensors:" + one per line
        more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
        return lines[1] + more
    return " ".join(lines) or type(e).__name__


def converted_folder(path_or_repo) -> Path:
    """The converted folder ``load`` reads: ``path_or_repo`` itself when it is one, else
    the cache folder its Hugging Face checkpoint (local or downloaded) is converted into."""
    path = _local_or_download(str(path_or_repo))
    return path if is_converted(path) else _convert_to_cache(str(path_or_repo), path)


def is_converted(path: Path) -> bool:
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return config.get("family") in FAMILIES and "text_config" in config


def load_converted(path: Path, lazy: bool = False) -> Tuple[Model, Processor]:
    """A converted folder, loaded strictly (no ``sanitize``: its tensors are the model's)."""
    path = Path(path)
    config = load_config(path)
    model = Model(ModelConfig.from_dict(config))
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    if config.get("quantization"):
        _quantize_like(model, config["quantization"], weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return model, Processor(tokenizer, model.config.processor_config)


def _quantize_like(model: Model, quantization: dict, weights: dict) -> None:
    """Quantize the layers the saved weights hold quantized, as mlx-lm's loader does."""

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mlx_llama3v").expanduser()


def _local_or_download(path_or_repo: str) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    return _download(path_or_repo)


def _convert_to_cache(name: str, source: Path) -> Path:
    """Convert a Hugging Face checkpoint once into the cache (float16, unquantized)."""
    target = cache_dir() / _cache_name(name, source)
    if not is_converted(target):
        converter.convert(str(source), target, force=target.exists())
    return target


def _cache_name(name: str, source: Path) -> str:
    """Readable and unique: the repo id, or a local folder's name plus a path hash."""
    if not Path(name).expanduser().exists():
        return name.replace("/", "--")
    digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:10]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', source.resolve().name)}-{digest}"
