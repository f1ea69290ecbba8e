"""Pretrain the demo's vision tower on the shapes pictures with SigLIP's sigmoid loss.

The recipe keeps the vision tower frozen: what the projector can learn to read is what
the tower's features make easy to read. A random tower carries every attribute
(``probe.py``: linear probes of kind and colour per quadrant at 0.99 or more), but not
in the directions gradient descent finds first: a projector and language model trained
on it picked colours up within 1000 steps and still told circles, squares and
triangles apart at chance (held-out presence 0.60 against 0.54 for a picture-blind
model). SigLIP's own objective fixes that before the tower is frozen: the tower and a
small text encoder are trained so that each picture's embedding matches its caption
(``top left a red circle , bottom right a blue square``) against every other caption
of the batch, pair by pair with a sigmoid loss (Zhai et al. 2023: a learned
temperature ``t`` and bias ``b``, ``-log sigmoid(z_ij (t cos_ij + b))``, ``z`` +1 for
a picture's own caption, -1 for the others).

Only the tower is kept; the text encoder and both projection heads are thrown away.
``build.py`` calls ``pretrain`` before writing the initial model.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import List, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dataset  # noqa: E402

WORDS = ["<pad>", "a", ","] + sorted(
    {w for p in dataset.PLACES for w in p.split()} | set(dataset.COLOURS) | set(dataset.KINDS)
)
MAX_WORDS = 3 * 6  # three shapes: "top left a red circle ," each


def caption(shapes: Sequence[dataset.Shape]) -> str:
    """Where each shape is and what it is: the contrastive text of a picture."""
    return " , ".join(f"{dataset.PLACES[s.place]} {s.words()}" for s in shapes)


def caption_ids(text: str) -> List[int]:
    ids = [WORDS.index(w) for w in text.split()]
    return ids + [0] * (MAX_WORDS - len(ids))


def pictures(n: int, seed: int):
    """n pictures (uint8, channels last) and their caption ids."""
    drawn = list(dataset.drawn(n, seed))
    images = np.stack([pixels for _, pixels in drawn])
    return images, np.array([caption_ids(caption(shapes)) for shapes, _ in drawn], dtype=np.int32)


def pretrain(
    vision_config: dict,
    steps: int,
    seed: int = 0,
    batch: int = 256,
    pictures_n: int = 0,
    log_every: int = 50,
):
    """A SigLIP-pretrained ``VisionTower`` for ``vision_config`` (a dict of its fields)."""
    import mlx_llama3v  # noqa: F401  (first: on Linux it links the fast BLAS before mlx.core)
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_llama3v.config import VisionConfig
    from mlx_llama3v.models.vision import VisionTower, make_tile_batch

    mx.random.seed(seed)
    config = VisionConfig(**vision_config)
    dim = 128
    tokens = (config.image_size // config.patch_size) ** 2

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = VisionTower(config)
            self.image_head = nn.Linear(tokens * config.hidden_size, dim)
            self.words = nn.Embedding(len(WORDS), dim)
            self.positions = nn.Embedding(MAX_WORDS, dim)
            self.text = nn.TransformerEncoder(2, dim, 4, mlp_dims=2 * dim)
            self.text_head = nn.Linear(dim, dim)
            self.t = mx.array([math.log(10.0)])
            self.b = mx.array([-10.0])

        def embed_images(self, batch):
            x = self.tower(batch)
            x = self.image_head(x.reshape(x.shape[0], -1))
            return x / mx.linalg.norm(x, axis=-1, keepdims=True)

        def embed_text(self, ids):
            real = (ids != 0)[..., None]
            x = self.words(ids) + self.positions(mx.arange(ids.shape[1]))
            key_mask = mx.where(ids != 0, 0.0, -1e9)[:, None, None, :]
            x = self.text(x, key_mask)
            x = (x * real).sum(axis=1) / real.sum(axis=1)
            x = self.text_head(x)
            return x / mx.linalg.norm(x, axis=-1, keepdims=True)

    def loss_fn(model, batch, ids):
        img, txt = model.embed_images(batch), model.embed_text(ids)
        logits = mx.exp(model.t) * (img @ txt.T) + model.b
        z = 2 * mx.eye(logits.shape[0]) - 1
        return -mx.mean(mx.sum(nn.log_sigmoid(z * logits), axis=1))

    n = pictures_n or steps * batch // 4
    images, captions = pictures(n, seed=seed + 777)
    model = Pair()
    mx.eval(model.parameters())
    schedule = optim.cosine_decay(1e-3, steps, 1e-5)
    opt = optim.AdamW(
        learning_rate=optim.join_schedules([optim.linear_schedule(1e-5, 1e-3, 50), schedule], [50]),
        weight_decay=1e-4,
    )
    step_fn = nn.value_and_grad(model, loss_fn)
    rng = np.random.default_rng(seed)
    start = time.time()
    for step in range(1, steps + 1):
        idx = rng.choice(n, batch, replace=False)
        tiles = (images[idx].astype(np.float32) / 255.0 - 0.5) / 0.5
        tb = make_tile_batch(list(tiles), config)
        loss, grads = step_fn(model, tb, mx.array(captions[idx]))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if step % log_every == 0 or step == steps:
            rate = step / (time.time() - start)
            print(
                f"tower pretraining: step {step}/{steps}, sigmoid loss {loss.item():.3f}, "
                f"{rate:.1f} steps/s, ETA {(steps - step) / rate:.0f} s",
                flush=True,
            )
    return model.tower
