"""The training loop: loss, accumulation, AdamW with warmup + cosine, clipping,
validation, checkpoints, progress and metrics.

One optimizer step consumes ``grad_accumulation_steps`` global micro-batches. The
loss is the mean cross-entropy over the assistant tokens of all of them (summed
token losses scaled by ``world / global target tokens``; see ``distributed``), so
the update does not depend on how the batch is split into micro-batches or ranks.
MLX's random generator is reseeded from (seed, micro-batch) before each
micro-batch, so dropout, like the data order, follows from the data position and a
resumed run repeats the uninterrupted one exactly.

A non-finite loss or gradient norm stops the run with ``TrainingDiverged``; nothing
is saved after the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map
from mlx_lm.tuner.trainer import grad_checkpoint
from mlx_lm.tuner.utils import build_schedule as lm_build_schedule
from tqdm import tqdm

from .batching import Batch, BatchPlan, collate
from .checkpoint import TrainState, latest_checkpoint, resume_checkpoint, save_checkpoint
from .data import Sample
from .distributed import World, zeros_like
from .features import VisionFeatures, project
from .metrics import METRICS, MetricsLog

class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf; the message is one line."""


@dataclass
class LoopArgs:
    iters: int = 100
    batch_size: int = 4
    grad_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    steps_per_eval: int = 0
    val_batches: int = -1
    steps_per_save: int = 100
    keep_checkpoints: int = 2
    grad_checkpoint: bool = False
    progress: bool = True


def build_schedule(args: LoopArgs):
    """Linear warmup to the peak learning rate, then cosine decay to ``min_lr_ratio`` of it.

    mlx-lm's ``build_schedule``: the warmup rises from ``lr / warmup_steps`` to ``lr`` over
    the first ``warmup_steps`` steps, then the cosine runs over the remaining ``iters``.
    """
    lr, warmup = args.learning_rate, max(0, args.warmup_steps)
    config = {
        "name": "cosine_decay",
        "arguments": [lr, max(1, args.iters - warmup), lr * args.min_lr_ratio],
    }
    if warmup > 1:  # mlx-lm joins the warmup at warmup + 1
        config.update(warmup=warmup - 1, warmup_init=lr / warmup)
    return lm_build_schedule(config)


def build_optimizer(args: LoopArgs) -> optim.Optimizer:
    return optim.AdamW(learning_rate=build_schedule(args), weight_decay=args.weight_decay)


def token_loss(model, ids, targets, embeds):
    """Summed cross-entropy of the target tokens, and their count."""
    logits = model.language_model(mx.array(ids[:, :-1]), input_embeddings=embeds[:, :-1])
    mask = mx.array(targets[:, 1:])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.array(ids[:, 1:])) * mask
    return ce.sum()


def _loss_through_projector(model, ids, targets, groups, n_tiles, scale):
    feats = project(model, groups, n_tiles)
    embeds = model.get_input_embeddings(ids, image_features=feats)
    return token_loss(model, ids, targets, embeds) * scale


def _loss_from_embeddings(model, ids, targets, embeds, scale):
    return token_loss(model, ids, targets, embeds) * scale


@dataclass
class TrainingData:
    """This rank's samples (by record number) and the global batch plans."""

    train: Dict[int, Sample]
    valid: Dict[int, Sample]
    plan: BatchPlan
    valid_plan: Optional[BatchPlan] = None


class Trainer:
    """Runs the optimizer steps over this rank's share of the batch plan.

    ``features`` gives the vision features of a batch; ``write_weights(folder)`` saves
    the trained weights into a checkpoint; ``fingerprint`` names the settings a
    checkpoint must match to be resumed; ``on_step(step)`` runs after each optimizer
    step, its metrics and any checkpoint (a caller may report progress or stop there).
    """

    def __init__(
        self,
        model,
        args: LoopArgs,
        data: TrainingData,
        *,
        features: VisionFeatures,
        trains_projector: bool,
        pad_id: int,
        out: Path,
        write_weights: Callable[[Path], object],
        fingerprint: str,
        world: Optional[World] = None,
        log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
        on_step: Optional[Callable[[int], None]] = None,
    ):
        self.model, self.args = model, args
        self.train_samples, self.valid_samples = data.train, data.valid
        self.plan, self.valid_plan = data.plan, data.valid_plan
        self.features, self.trains_projector = features, trains_projector
        self.pad_id, self.out = pad_id, Path(out)
        self.write_weights, self.fingerprint = write_weights, fingerprint
        self.world = world or World()
        self.log, self.on_step = log, on_step
        self.optimizer = build_optimizer(args)
        self.metrics = MetricsLog(self.out / METRICS, enabled=self.world.is_main)
        self.state = TrainState(seed=args.seed, fingerprint=fingerprint)
        loss = _loss_through_projector if trains_projector else _loss_from_embeddings
        self.value_and_grad = nn.value_and_grad(model, loss)

    # -------------------------------------------------------------- resume
    def resume(self) -> bool:
        """Continue from the newest good checkpoint of ``out``; False when there is none."""
        found = resume_checkpoint(
            self.out,
            self.model,
            self.optimizer,
            self.fingerprint,
            self.args.grad_accumulation_steps,
            self.log,
        )
        if found is None:
            return False
        path, self.state = found
        self.metrics.truncate_after(self.state.step)
        self.log(f"Resumed from {path} (step {self.state.step})")
        return True

    # -------------------------------------------------------------- steps
    def run(self) -> TrainState:
        layer = self.model.language_model.layers[0]
        with checkpointed(layer) if self.args.grad_checkpoint else contextlib.nullcontext():
            return self._run()

    def _run(self) -> TrainState:
        args = self.args
        self.model.train()
        bar = tqdm(
            total=args.iters,
            initial=self.state.step,
            disable=not (args.progress and self.world.is_main),
            dynamic_ncols=True,
            file=sys.stderr,
            desc="train",
        )
        with bar:
            while self.state.step < args.iters:
                tic = time.perf_counter()
                loss, tokens = self.step()
                self.state.step += 1
                self._report(loss, tokens, time.perf_counter() - tic, bar)
                step = self.state.step
                if args.steps_per_eval and step % args.steps_per_eval == 0 and step < args.iters:
                    self._validate()
                if step % args.steps_per_save == 0 and step < args.iters:
                    self.save()
                if self.on_step is not None:
                    self.on_step(step)
        self._validate()
        self.save()
        return self.state

    def step(self):
        """One optimizer step; returns (mean target-token loss, tokens seen), global."""
        args, world = self.args, self.world
        micro = [
            self._mine(self.plan.batch(self.state.micro_batches + k))
            for k in range(args.grad_accumulation_steps)
        ]
        local_targets = sum(int(s.targets[1:].sum()) for m in micro for s in m)
        local_tokens = sum(s.length for m in micro for s in m)
        total_targets, tokens = world.sum([local_targets, local_tokens])
        scale = world.size / max(total_targets, 1.0)
        grads, loss = None, mx.array(0.0)
        for k, samples in enumerate(micro):
            mx.random.seed(_micro_seed(args.seed, self.state.micro_batches + k))
            if not samples:
                continue
            value, g = self._micro_step(collate(samples, self.pad_id), scale)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            loss = loss + value
            mx.eval(loss, grads)
        self.state.micro_batches += args.grad_accumulation_steps
        if grads is None:
            grads = zeros_like(self.model.trainable_parameters())
        grads = world.average(grads)
        loss = float(world.sum([loss.item()])[0]) / world.size
        norm = None
        if args.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, args.max_grad_norm)
        self._check_finite(loss, norm)
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self.optimizer.state)
        return loss, int(tokens)

    def _micro_step(self, batch: Batch, scale: float):
        groups, n_tiles = self.features(batch.images)
        if self.trains_projector:
            return self.value_and_grad(
                self.model, batch.ids, batch.targets, groups, n_tiles, mx.array(scale)
            )
        embeds = self.model.get_input_embeddings(
            batch.ids, image_features=project(self.model, groups, n_tiles)
        )
        return self.value_and_grad(self.model, batch.ids, batch.targets, embeds, mx.array(scale))

    def _mine(self, records: Sequence[int]) -> List[Sample]:
        return [self.train_samples[i] for i in records if i in self.train_samples]

    def _check_finite(self, loss: float, norm) -> None:
        bad = not math.isfinite(loss)
        what = f"loss {loss}"
        if norm is not None and not bad:
            norm = norm.item()
            bad, what = not math.isfinite(norm), f"gradient norm {norm}"
        if bad:
            last = latest_checkpoint(self.out)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
            raise TrainingDiverged(
                f"{what} at step {self.state.step + 1}: training stopped, nothing saved after "
                f"it; {keep} (lower --learning-rate or raise --warmup-steps, then --resume)"
            )

    # -------------------------------------------------------------- reporting
    def _report(self, loss: float, tokens: int, seconds: float, bar) -> None:
        peak = mx.get_peak_memory() / 1e9
        entry = {
            "step": self.state.step,
            "loss": loss,
            "learning_rate": float(self.optimizer.learning_rate.item()),
            "tokens": tokens,
            "tokens_per_second": tokens / max(seconds, 1e-9),
            "step_seconds": seconds,
            "peak_memory_gb": peak,
        }
        self.metrics.write(entry)
        bar.set_postfix(
            loss=f"{loss:.4f}", tok_s=f"{entry['tokens_per_second']:.0f}", peak=f"{peak:.2f}GB"
        )
        bar.update(1)

    def evaluate(self) -> Optional[float]:
        """Mean target-token loss over the validation set (``val_batches`` batches)."""
        if self.valid_plan is None:
            return None
        self.model.eval()
        batches = self.valid_plan.epoch(0)
        if self.args.val_batches > 0:
            batches = batches[: self.args.val_batches]
        total, count = 0.0, 0
        for records in batches:
            samples = [self.valid_samples[i] for i in records if i in self.valid_samples]
            if not samples:
                continue
            batch = collate(samples, self.pad_id)
            groups, n_tiles = self.features(batch.images)
            embeds = self.model.get_input_embeddings(
                batch.ids, image_features=project(self.model, groups, n_tiles)
            )
            total += token_loss(self.model, batch.ids, batch.targets, embeds).item()
            count += batch.num_targets
        self.model.train()
        total, count = self.world.sum([total, count])
        return total / count if count else None

    def _validate(self) -> None:
        val = self.evaluate()
        if val is None:
            return
        self.metrics.write({"step": self.state.step, "val_loss": val})
        if self.world.is_main:
            tqdm.write(f"step {self.state.step}: validation loss {val:.4f}", file=sys.stderr)

    def save(self) -> None:
        if self.world.is_main:
            save_checkpoint(
                self.out, self.state, self.write_weights, self.optimizer, self.args.keep_checkpoints
            )


def _micro_seed(seed: int, micro: int) -> int:
    return (seed * 1_000_003 + micro) % (1 << 31)


@contextlib.contextmanager
def checkpointed(layer):
    """mlx-lm's gradient checkpointing of every block of ``layer``'s class, for the run.

    mlx-lm patches the class's ``__call__`` for good; it is restored afterwards so that
    later uses of the class in this process (generation with a KV cache) run as usual.
    """
    cls = type(layer)
    original = cls.__call__
    grad_checkpoint(layer)
    try:
        yield
    finally:
        cls.__call__ = original
