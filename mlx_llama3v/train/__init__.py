"""Train Llama 3-V style models: ``python -m mlx_llama3v.train`` / ``train(TrainConfig(...))``.

The two-stage recipe:

1. ``--stage pretrain``: only the projector trains (vision tower and language model
   frozen), reading vision features from a cache (``--features``, made by
   ``mlx_llama3v.embed``) or encoding the images on the fly.
2. ``--stage sft``: the language model trains with mlx-lm's LoRA/DoRA layers (QLoRA on
   a quantized conversion) or in full; the projector too with ``--train-projector``.

Modules: ``readers`` (every data format, streamed), ``data`` (records, templates, loss
masks, bad-data reports), ``batching``
(length buckets, padding), ``features`` (frozen vision features, projection),
``tuning`` (what trains; adapter files), ``loop`` (optimizer steps, validation,
metrics), ``checkpoint`` (atomic, resumable), ``distributed`` (data parallel over
``mlx.launch`` ranks), ``metrics`` (JSONL, loss PNG), ``run`` (one run), ``cli``.
"""

from .loop import LoopArgs, TrainingDiverged
from .run import TrainConfig, TrainError, TrainResult, train
from .tuning import TuneConfig

__all__ = [
    "LoopArgs",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "TrainingDiverged",
    "TuneConfig",
    "train",
]
