"""Load a converted model and its processor: ``model, processor = load(path_or_repo)``.

A converted folder (config.json with a ``family``) loads through mlx-lm's own
``load_model`` with this package's model classes: quantized layers are rebuilt where
the weights carry ``.scales`` and the weights are loaded strictly, with no
``sanitize`` (a converted folder's tensors are already the model's): no tensor may be
missing or left over. Every weight file's header is checked first, so a truncated,
empty or garbled file is one ``DamagedFileError`` naming it; ``verify=True`` also
checks the sha256 checksums ``convert`` recorded. A Hugging Face checkpoint (folder or repo id) is converted first, in float16,
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
from pathlib import Path
from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.utils import load_model
from transformers import PreTrainedTokenizerFast

from . import convert as converter
from ._mlx_lm import download
from .errors import DamagedFileError, UserError
from .files import check_safetensors, read_json, verify_checksums
from .config import FAMILIES, ModelConfig
from .models.llama3v import Model
from .processing import Processor

CACHE_ENV = "MLX_LLAMA3V_CACHE"


def load(
    path_or_repo: str,
    adapter_path: Optional[str] = None,
    *,
    lazy: bool = False,
    verify: bool = False,
) -> Tuple[Model, Processor]:
    """The model and processor of a converted folder, or of a checkpoint converted on the fly.

    ``adapter_path``: a fine-tuning run's adapters (see ``apply_adapter_folder``).
    ``verify``: check the weight files against the checksums ``convert`` recorded.
    """
    model, processor = load_converted(converted_folder(path_or_repo), lazy=lazy, verify=verify)
    if adapter_path is not None:
        apply_adapter_folder(model, adapter_path)
    return model, processor


ADAPTER_CONFIG = "adapter_config.json"
ADAPTERS = "adapters.safetensors"
PROJECTOR = "projector.safetensors"


class AdapterError(UserError, ValueError):
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
        check_safetensors(folder / PROJECTOR)
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

    if not isinstance(read_json(folder / ADAPTER_CONFIG, DamagedFileError), dict):
        raise DamagedFileError(f"{folder / ADAPTER_CONFIG}: not a JSON object")
    check_safetensors(folder / ADAPTERS)

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
    path = local_or_download(str(path_or_repo))
    return path if is_converted(path) else _convert_to_cache(str(path_or_repo), path)


def is_converted(path: Path) -> bool:
    try:
        with open(path / "config.json", encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return config.get("family") in FAMILIES and "text_config" in config


class _Converted(Model):
    """The model of a converted folder: its tensors are already the model's, so mlx-lm's
    loader must not ``sanitize`` them (that would drop left-over tensors silently)."""

    def sanitize(self, weights: dict) -> dict:
        return weights


def load_converted(path: Path, lazy: bool = False, verify: bool = False) -> Tuple[Model, Processor]:
    """A converted folder, loaded strictly by mlx-lm's ``load_model``."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no model*.safetensors in {path}")
    for f in files:
        check_safetensors(f)
    if verify:
        verify_checksums(path, [f.name for f in files])
    model, _ = load_model(
        path, lazy=lazy, strict=True, get_model_classes=lambda config: (_Converted, ModelConfig)
    )
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path))
    return model, Processor(tokenizer, model.config.processor_config)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/mlx_llama3v").expanduser()


def local_or_download(path_or_repo: str) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.exists():
        return path
    return download(path_or_repo)


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
