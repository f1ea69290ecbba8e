"""``train(config)``: one training run, from a converted model folder to adapters.

Loads the model (``loading.load``), marks what trains (``tuning``), reads this
rank's share of the data (``data``), plans the global batches (``batching``), and
runs the ``loop.Trainer``. The output folder ends up holding the adapters and/or
projector (``tuning.save_outputs``), ``metrics.jsonl``, ``loss.png`` and the
resumable ``checkpoints/``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx

from ..loading import load
from .batching import BatchPlan
from .checkpoint import CHECKPOINTS, TrainState
from .data import DataError, DataReport, SampleEncoder, Sample, load_samples, split_train_valid
from .distributed import World
from .features import VisionFeatures, cache_layout
from .loop import LoopArgs, Trainer, TrainingData
from .readers import ReaderError, check_source
from .metrics import METRICS, PLOT, plot_losses, read_metrics
from .tuning import TuneConfig, describe_counts, parameter_counts, prepare_model, save_outputs
from ..errors import UserError
from ..files import check_writable, writing


class TrainError(UserError, ValueError):
    """The run cannot start as asked; the message is one line for the user."""


@dataclass
class TrainConfig:
    model: str
    data: List[str]
    out: str = "adapters"
    valid: List[str] = field(default_factory=list)
    valid_fraction: float = 0.0
    image_root: Optional[str] = None
    features: Optional[str] = None
    max_length: int = 2048
    strict: bool = False
    resume: bool = False
    tune: TuneConfig = field(default_factory=TuneConfig)
    loop: LoopArgs = field(default_factory=LoopArgs)


@dataclass
class TrainResult:
    model: object
    state: TrainState
    counts: Dict[str, int]
    train_report: DataReport
    valid_report: Optional[DataReport]
    out: Path


def train(
    config: TrainConfig,
    log: Callable[[str], None] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> TrainResult:
    world = World()
    log = log or (lambda s: print(s, file=sys.stderr) if world.is_main else None)
    out = Path(config.out).expanduser()
    _check_out(out, config.resume)
    mx.random.seed(config.loop.seed)  # LoRA initialisation
    model, processor = load(config.model)
    prepare_model(model, config.tune)
    counts = parameter_counts(model)
    cache = _feature_cache(config.features, model, config.model)
    encoder = SampleEncoder(
        processor.tokenizer,
        processor.config,
        model.config.projector_config,
        config.max_length,
        layout=cache_layout(cache, processor.config) if cache is not None else None,
    )
    train_set, valid_set, reports = _read_data(config, encoder, world, log)
    log(describe_counts(counts))
    plan = BatchPlan(
        world.gather_lengths({i: s.length for i, s in train_set.items()}, reports[0].records),
        config.loop.batch_size,
        config.loop.seed,
    )
    valid_plan = None
    if reports[1] is not None:
        lengths = world.gather_lengths({i: s.length for i, s in valid_set.items()}, reports[1].records)
        valid_plan = BatchPlan(lengths, config.loop.batch_size, config.loop.seed) if lengths else None
    note = _note(config)
    write = lambda folder: save_outputs(model, config.tune, folder, note)
    trainer = Trainer(
        model,
        config.loop,
        TrainingData(train_set, valid_set, plan, valid_plan),
        features=VisionFeatures(model, processor.config, cache),
        trains_projector=config.tune.trains_projector,
        pad_id=_pad_id(processor.tokenizer, model.config.image_token_id),
        out=out,
        write_weights=write,
        fingerprint=_fingerprint(config),
        world=world,
        log=log,
        on_step=on_step,
    )
    if world.is_main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    if config.resume and not trainer.resume():
        log(f"no checkpoint in {out}: starting from the beginning")
    if trainer.state.step == 0:
        trainer.metrics.truncate_after(0)  # a run that died before its first checkpoint
    log(
        f"{len(plan)} batches of {plan.batch_size} per epoch over {world.size} rank(s); "
        f"{config.loop.iters} steps of {config.loop.grad_accumulation_steps} micro-batch(es)"
    )
    state = trainer.run()
    if world.is_main:
        write(out)
        plot_losses(read_metrics(out / METRICS), out / PLOT)
        log(f"Saved to {out}")
    return TrainResult(model, state, counts, reports[0], reports[1], out)


def _check_out(out: Path, resume: bool) -> None:
    check_writable(out)
    if not resume and (out / CHECKPOINTS).exists():
        raise TrainError(
            f"{out} already holds a training run: pass --resume to continue it, "
            "or choose another --out"
        )


# the cache settings that must match the model being trained
MATCHING_SETTINGS = ("family", "vision_config", "preprocessing", "vision_fingerprint")


def _feature_cache(path: Optional[str], model, model_name: str):
    """The ``--features`` cache, refused at once if another model (or other image
    settings) made it, or if a shard is missing or has the wrong size."""
    if path is None:
        return None
    from ..embed import CacheError, FeatureCache
    from ..embed.runner import load_vision, make_settings

    try:
        cache = FeatureCache(path)
    except CacheError as e:
        raise TrainError(str(e)) from None
    tower, processor_config, family, _ = load_vision(model)
    expected = make_settings(tower, processor_config, family, cache.settings.get("dtype", ""))
    differ = [k for k in MATCHING_SETTINGS if cache.settings.get(k) != expected[k]]
    if differ:
        raise TrainError(
            f"{path}: the feature cache was made with other settings than {model_name} "
            f"({', '.join(differ)} differ); encode the images again with mlx_llama3v.embed "
            "--model for this model, or leave out --features"
        )
    try:
        cache.check_files()
    except CacheError as e:
        raise TrainError(str(e)) from None
    return cache


def _read_data(
    config: TrainConfig, encoder: SampleEncoder, world: World, log
) -> Tuple[Dict[int, Sample], Dict[int, Sample], Tuple[DataReport, Optional[DataReport]]]:
    """This rank's training and validation samples (by record number) and the reports.

    Bad records are reported by the rank that reads them; under ``strict`` every rank
    stops together when any rank found one.
    """
    error = None
    train, valid, reports = [], [], (DataReport(), None)
    try:
        _exists(config.data + config.valid)
        train, train_report = _load(config.data, encoder, config, world, log)
        valid_report = None
        if config.valid:
            valid, valid_report = _load(config.valid, encoder, config, world, log)
        elif config.valid_fraction > 0:
            train, valid = split_train_valid(train, config.valid_fraction, config.loop.seed)
            valid_report = DataReport(kept=len(valid), records=train_report.records)
            train_report.kept -= len(valid)
        reports = (train_report, valid_report)
    except (DataError, TrainError) as e:
        error = e
    if not world.agree(error is None):
        raise error if error is not None else DataError("another rank found bad data (see its output)")
    _summarise(reports, world, log)
    if world.size > 1:
        print(f"rank {world.rank}: read {len(train)} training and {len(valid)} validation "
              "samples", file=sys.stderr)
    if not world.agree(bool(world.sum([len(train)])[0])):
        raise TrainError("no usable training samples")
    return {s.index: s for s in train}, {s.index: s for s in valid}, reports


def _load(paths, encoder, config, world, log):
    return load_samples(
        paths,
        encoder,
        Path(config.image_root) if config.image_root else None,
        strict=config.strict,
        keep=world.owns,
        progress=config.loop.progress and world.is_main,
        log=log if world.size == 1 else (lambda s: print(f"[rank {world.rank}] {s}", file=sys.stderr)),
    )


def _exists(paths) -> None:
    for p in paths:
        try:
            check_source(p)
        except ReaderError as e:
            raise TrainError(str(e)) from None


def _summarise(reports, world: World, log) -> None:
    """One line per data set; over several ranks the counts are summed."""
    for name, report in zip(("train", "valid"), reports):
        if report is None:
            continue
        if world.size > 1:
            kept, short, tokens, images, bad = world.all_sum(
                [report.kept, report.shortened, report.tokens_dropped,
                 report.images_dropped, report.num_skipped]
            )
            report = DataReport(
                int(kept), report.records, Counter({"bad records": int(bad)} if bad else {}),
                int(short), int(tokens), int(images),
            )
        log(report.summary(name))


def _pad_id(tokenizer, image_token_id: int) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0, 1):
        if tid is not None and tid != image_token_id:
            return int(tid)
    return 2


def _note(config: TrainConfig) -> Dict:
    return {
        "model": str(config.model),
        "stage": config.tune.stage,
        "data": [str(p) for p in config.data],
        "features": config.features,
        "max_length": config.max_length,
        **{k: v for k, v in asdict(config.loop).items() if k not in ("progress",)},
    }


def _fingerprint(config: TrainConfig) -> str:
    """A digest of the settings a resumed run must share with the first one."""
    keep = {
        "model": str(config.model),
        "data": [str(p) for p in config.data],
        "valid": [str(p) for p in config.valid],
        "valid_fraction": config.valid_fraction,
        "max_length": config.max_length,
        "tune": asdict(config.tune),
        "loop": {
            k: v
            for k, v in asdict(config.loop).items()
            if k not in ("progress", "steps_per_save", "keep_checkpoints", "steps_per_eval", "val_batches")
        },
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
