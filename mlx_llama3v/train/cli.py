"""Command line for ``mlx_llama3v.train`` (typer); the work is done by ``run.train``.

Exit status: 0 done; 1 the loss diverged (NaN/inf; the last good checkpoint is
kept); 2 bad input (options, data under ``--strict``, a checkpoint that does not
fit), reported as one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import math
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

from ..cli import command, fail, new_app, run_app

app = new_app()


class Stage(str, Enum):
    pretrain = "pretrain"
    sft = "sft"


class FineTune(str, Enum):
    lora = "lora"
    dora = "dora"
    full = "full"


def check_numbers(**values: float) -> None:
    """Each ``--name`` given as name=(value, low, high): finite and within [low, high]."""
    for name, (value, low, high) in values.items():
        flag = "--" + name.replace("_", "-")
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            bound = f"at least {low}" + (f" and at most {high}" if high is not None else "")
            fail(f"{flag} must be a finite number, {bound}; got {value}")


@command(
    app,
    help="Train a Llama 3-V style model. Stage 'pretrain' trains the projector alone (vision "
    "tower and LLM frozen), from a feature cache (--features) or encoding images on the fly; "
    "stage 'sft' fine-tunes the language model with LoRA/DoRA (QLoRA on a quantized model) or "
    "in full. Run it under mlx.launch for data-parallel training.",
)
def run(
    model: str = typer.Option(..., "--model", "-m", help="Converted model folder (or repo id)."),
    data: List[Path] = typer.Option(..., "--data", "-d", help="Training data: .json/.jsonl (LLaVA, MiniCPM-V, chat), a saved datasets folder, .parquet, or hf:<id>[:split]; repeatable."),
    out: Path = typer.Option(Path("adapters"), "--out", "-o", help="Output folder (adapters, checkpoints, metrics)."),
    stage: Stage = typer.Option(Stage.sft, "--stage", help="pretrain: projector only; sft: language model."),
    valid: List[Path] = typer.Option([], "--valid", help="Validation data file; repeatable."),
    valid_fraction: float = typer.Option(0.0, "--valid-fraction", help="Hold out this share of --data for validation."),
    image_root: Optional[Path] = typer.Option(None, "--image-root", help="Folder relative image paths start from (default: the data file's)."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature cache from mlx_llama3v.embed (skips the vision tower)."),
    max_length: int = typer.Option(2048, "--max-length", help="Longest sequence in tokens (longer samples are shortened or skipped)."),
    strict: bool = typer.Option(False, "--strict", help="Stop at the first bad record instead of skipping it."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in --out."),
    fine_tune_type: FineTune = typer.Option(FineTune.lora, "--fine-tune-type", help="sft: lora, dora or full (full: every language-model weight, or the last --num-layers blocks)."),
    num_layers: int = typer.Option(-1, "--num-layers", help="sft: adapt the last N blocks (-1: all)."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="LoRA rank."),
    lora_alpha: float = typer.Option(16.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
    lora_dropout: float = typer.Option(0.0, "--lora-dropout", help="Dropout on the LoRA input."),
    lora_keys: Optional[str] = typer.Option(
        None, "--lora-keys", help="Comma-separated projections to adapt, e.g. "
        "self_attn.q_proj,self_attn.v_proj (default: every linear of a block)."
    ),
    train_projector: bool = typer.Option(False, "--train-projector", help="sft: train the projector too."),
    iters: int = typer.Option(1000, "--iters", help="Optimizer steps."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Global batch size (all ranks together)."),
    grad_accumulation_steps: int = typer.Option(1, "--grad-accumulation-steps", help="Micro-batches per optimizer step."),
    learning_rate: float = typer.Option(1e-4, "--learning-rate", "--lr", help="Peak learning rate."),
    warmup_steps: int = typer.Option(0, "--warmup-steps", help="Linear warmup steps."),
    min_lr_ratio: float = typer.Option(0.0, "--min-lr-ratio", help="Cosine decay ends at this share of the peak."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm (0: off)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order, LoRA init and dropout."),
    steps_per_eval: int = typer.Option(0, "--steps-per-eval", help="Validate every N steps (and at the end)."),
    val_batches: int = typer.Option(-1, "--val-batches", help="Validation batches (-1: all)."),
    save_every: int = typer.Option(100, "--save-every", help="Checkpoint every N steps (and at the end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Checkpoints kept on disk."),
    grad_checkpoint: bool = typer.Option(False, "--grad-checkpoint", help="Recompute activations in the backward pass (less memory)."),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."),
) -> None:
    from .loop import LoopArgs, TrainingDiverged
    from .run import TrainConfig, train
    from .tuning import TuneConfig

    if lora_rank < 1:
        fail("--lora-rank must be at least 1")
    if min(iters, batch_size, grad_accumulation_steps, save_every, keep_checkpoints) < 1:
        fail("--iters, --batch-size, --grad-accumulation-steps, --save-every and --keep-checkpoints must be positive")
    if not 0 <= valid_fraction < 1:
        fail("--valid-fraction must be in [0, 1)")
    if learning_rate <= 0 or not math.isfinite(learning_rate):
        fail(f"--learning-rate must be a positive finite number; got {learning_rate}")
    check_numbers(
        lora_alpha=(lora_alpha, 0, None),
        lora_dropout=(lora_dropout, 0, 1),
        min_lr_ratio=(min_lr_ratio, 0, 1),
        weight_decay=(weight_decay, 0, None),
        max_grad_norm=(max_grad_norm, 0, None),
        warmup_steps=(warmup_steps, 0, None),
        max_length=(max_length, 1, None),
        steps_per_eval=(steps_per_eval, 0, None),
    )
    keys = [k.strip() for k in lora_keys.split(",") if k.strip()] if lora_keys else None
    config = TrainConfig(
        model=model,
        data=[str(p) for p in data],
        out=str(out),
        valid=[str(p) for p in valid],
        valid_fraction=valid_fraction,
        image_root=str(image_root) if image_root else None,
        features=str(features) if features else None,
        max_length=max_length,
        strict=strict,
        resume=resume,
        tune=TuneConfig(
            stage=stage.value,
            fine_tune_type=fine_tune_type.value,
            num_layers=num_layers,
            lora_parameters={
                "rank": lora_rank,
                "scale": lora_alpha / lora_rank,
                "dropout": lora_dropout,
                "keys": keys,
            },
            train_projector=train_projector,
        ),
        loop=LoopArgs(
            iters=iters,
            batch_size=batch_size,
            grad_accumulation_steps=grad_accumulation_steps,
            learning_rate=learning_rate,
            warmup_steps=warmup_steps,
            min_lr_ratio=min_lr_ratio,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            seed=seed,
            steps_per_eval=steps_per_eval,
            val_batches=val_batches,
            steps_per_save=save_every,
            keep_checkpoints=keep_checkpoints,
            grad_checkpoint=grad_checkpoint,
            progress=sys.stderr.isatty() if progress is None else progress,
        ),
    )
    try:
        train(config)
    except TrainingDiverged as e:
        fail(e, code=1)
    except FileNotFoundError as e:
        fail(e)


def main() -> None:
    run_app(app, "mlx_llama3v.train")


if __name__ == "__main__":
    main()
