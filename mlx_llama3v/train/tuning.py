"""What trains in each stage, and the files that hold it.

- ``pretrain``: only the projector trains; the vision tower and the language model
  are frozen.
- ``sft``: the language model trains with mlx-lm's LoRA / DoRA layers
  (``linear_to_lora_layers``; on a 4/8-bit converted model this is QLoRA) or in full
  (its last ``num_layers`` blocks); the projector too with ``train_projector``.

Outputs use mlx-lm's adapter format, so ``mlx_lm``'s ``load_adapters(
model.language_model, folder)`` applies them: ``adapter_config.json`` (its
``fine_tune_type``, ``num_layers``, ``lora_parameters``) and ``adapters.safetensors``
keyed like ``model.layers.0.self_attn.q_proj.lora_a``. A trained projector is saved
beside them as ``projector.safetensors`` (keys relative to ``model.projector``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import get_total_parameters

from ..files import write_json, writing

STAGES = ("pretrain", "sft")
FINE_TUNE_TYPES = ("lora", "dora", "full")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTERS = "adapters.safetensors"
PROJECTOR = "projector.safetensors"
TRAINING_CONFIG = "training_config.json"


@dataclass
class TuneConfig:
    """Which parameters train. ``lora_parameters`` uses mlx-lm's keys (rank, scale,
    dropout, keys: None for every linear of a block, else e.g. ["self_attn.q_proj"])."""

    stage: str = "sft"
    fine_tune_type: str = "lora"
    num_layers: int = -1
    lora_parameters: Dict = field(
        default_factory=lambda: {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": None}
    )
    train_projector: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.fine_tune_type not in FINE_TUNE_TYPES:
            raise ValueError(
                f"fine-tune type must be one of {', '.join(FINE_TUNE_TYPES)}, "
                f"got {self.fine_tune_type!r}"
            )

    @property
    def trains_projector(self) -> bool:
        return self.stage == "pretrain" or self.train_projector

    @property
    def trains_language_model(self) -> bool:
        return self.stage == "sft"


def prepare_model(model, config: TuneConfig) -> None:
    """Freeze everything, then unfreeze (or add adapters to) what ``config`` trains."""
    model.freeze()
    lm = model.language_model
    if config.num_layers < 0 or config.num_layers > len(lm.layers):
        config.num_layers = len(lm.layers)
    if config.trains_language_model:
        if config.fine_tune_type == "full" and config.num_layers == len(lm.layers):
            # all of it, embeddings, final norm and head included (mlx-lm's "full" trains
            # the blocks only, which cannot teach a language model new outputs)
            lm.unfreeze()
        elif config.fine_tune_type == "full":
            for layer in lm.layers[-config.num_layers :] if config.num_layers else []:
                layer.unfreeze()
        else:
            linear_to_lora_layers(
                lm,
                config.num_layers,
                dict(config.lora_parameters),
                use_dora=config.fine_tune_type == "dora",
            )
    if config.trains_projector:
        model.projector.unfreeze()


def parameter_counts(model) -> Dict[str, int]:
    """Trainable parameters per part, their total, and the model's total (as mlx-lm counts
    it: quantized weights at their unquantized size)."""
    counts = {
        part: sum(v.size for _, v in tree_flatten(getattr(model, part).trainable_parameters()))
        for part in ("vision_tower", "projector", "language_model")
    }
    counts["trainable"] = sum(counts.values())
    counts["total"] = get_total_parameters(model)
    return counts


def describe_counts(counts: Dict[str, int]) -> str:
    parts = ", ".join(
        f"{part} {counts[part]:,}"
        for part in ("projector", "language_model", "vision_tower")
        if counts[part]
    )
    share = 100 * counts["trainable"] / max(1, counts["total"])
    return (
        f"Trainable parameters: {counts['trainable']:,} of {counts['total']:,} "
        f"({share:.3f}%): {parts or 'none'}"
    )


def save_outputs(model, config: TuneConfig, folder: Path, note: Dict) -> List[Path]:
    """Write the trained weights in the adapter format (see the module docstring).

    ``note`` (the run's settings) goes into ``training_config.json`` and, for
    ``sft``, into ``adapter_config.json`` beside mlx-lm's fields.
    """
    with writing(folder):
        return _save_outputs(model, config, Path(folder), note)


def _save_outputs(model, config: TuneConfig, folder: Path, note: Dict) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if config.trains_language_model:
        weights = dict(tree_flatten(model.language_model.trainable_parameters()))
        mx.save_safetensors(str(folder / ADAPTERS), weights, metadata={"format": "mlx"})
        adapter_config = dict(note, **adapter_fields(config))
        write_json(folder / ADAPTER_CONFIG, adapter_config)
        written += [folder / ADAPTERS, folder / ADAPTER_CONFIG]
    if config.trains_projector:
        weights = dict(tree_flatten(model.projector.parameters()))
        mx.save_safetensors(str(folder / PROJECTOR), weights, metadata={"format": "mlx"})
        written.append(folder / PROJECTOR)
    write_json(folder / TRAINING_CONFIG, dict(note, **asdict(config)))
    written.append(folder / TRAINING_CONFIG)
    return written


def adapter_fields(config: TuneConfig) -> Dict:
    """mlx-lm's adapter_config.json fields (what ``load_adapters`` reads)."""
    return {
        "fine_tune_type": config.fine_tune_type,
        "num_layers": config.num_layers,
        "lora_parameters": (
            None if config.fine_tune_type == "full" else dict(config.lora_parameters)
        ),
        "train_projector": config.train_projector,
    }


def load_projector(model, path) -> None:
    """Load ``projector.safetensors`` (keys relative to ``model.projector``) strictly."""
    weights = mx.load(str(path))
    model.projector.load_weights(list(weights.items()), strict=True)
