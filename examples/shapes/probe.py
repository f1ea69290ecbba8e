"""Linear probes on the vision tower's features: what a frozen tower lets a reader see.

    python examples/shapes/probe.py [--model examples/shapes/model]

    python examples/shapes/probe.py --random   # a random tower of the same shape

For freshly drawn pictures, a ridge-regression classifier (one-vs-rest, on the
flattened, standardised tower output of each picture) is fitted per attribute on one
set and scored on another: for each quadrant, which kind of shape is there (none,
circle, square, triangle) and its colour (none or one of four), and how many shapes
the picture holds. Beside each score: always answering the most common label, and the
same probe on only the top 8 principal directions of the features: whether the
attribute is in the directions of greatest variance, which gradient descent picks up
first, or hidden in small ones (present, but slow to learn to read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import dataset  # noqa: E402

ATTRIBUTES = [f"kind {p}" for p in dataset.PLACES] + [f"colour {p}" for p in dataset.PLACES]
ATTRIBUTES.append("count")
CLASSES = [4] * 4 + [5] * 4 + [4]


def pictures(n: int, seed: int):
    """n pictures as normalised arrays (the processor's mean/std 0.5), and their labels."""
    images, labels = [], []
    for shapes, pixels in dataset.drawn(n, seed):
        images.append((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5)
        kind, colour = [0] * 4, [0] * 4
        for s in shapes:
            kind[s.place] = 1 + dataset.KINDS.index(s.kind)
            colour[s.place] = 1 + list(dataset.COLOURS).index(s.colour)
        labels.append(kind + colour + [len(shapes)])
    return images, np.array(labels)


def tower_features(tower, images, batch: int = 256) -> np.ndarray:
    rows = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        out = [None] * len(chunk)
        for group, _, feats in tower.encode(chunk):
            for k, i in enumerate(group):
                out[i] = np.array(feats[k]).reshape(-1)
        rows.extend(out)
    return np.stack(rows)


def ridge_probe(x_fit, y_fit, x_test, y_test, classes: int, lam: float = 1e-3) -> float:
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
    x_fit = np.hstack([(x_fit - mu) / sd, np.ones((len(x_fit), 1))])
    x_test = np.hstack([(x_test - mu) / sd, np.ones((len(x_test), 1))])
    gram = x_fit.T @ x_fit + lam * len(x_fit) * np.eye(x_fit.shape[1])
    w = np.linalg.solve(gram, x_fit.T @ np.eye(classes)[y_fit])
    return float(((x_test @ w).argmax(1) == y_test).mean())


def probe(tower, n_fit: int = 4000, n_test: int = 1000, top: int = 8) -> dict:
    fit_images, fit_labels = pictures(n_fit, seed=1)
    test_images, test_labels = pictures(n_test, seed=2)
    x_fit, x_test = tower_features(tower, fit_images), tower_features(tower, test_images)
    centred = x_fit - x_fit.mean(0)
    directions = np.linalg.svd(centred, full_matrices=False)[2][:top].T
    report = {}
    for i, (name, classes) in enumerate(zip(ATTRIBUTES, CLASSES)):
        majority = np.bincount(fit_labels[:, i], minlength=classes).argmax()
        report[name] = {
            "probe": ridge_probe(x_fit, fit_labels[:, i], x_test, test_labels[:, i], classes),
            "top": ridge_probe(
                x_fit @ directions,
                fit_labels[:, i],
                x_test @ directions,
                test_labels[:, i],
                classes,
            ),
            "majority": float((test_labels[:, i] == majority).mean()),
        }
    return report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(HERE / "model"))
    ap.add_argument("--random", action="store_true", help="a random tower of the model's shape")
    args = ap.parse_args()
    import mlx.core as mx

    from mlx_llama3v import load
    from mlx_llama3v.models.vision import VisionTower

    tower = load(args.model)[0].vision_tower
    if args.random:
        mx.random.seed(0)
        tower = VisionTower(tower.config)
    print("| attribute | linear probe | top 8 directions | most common label |")
    print("|---|---|---|---|")
    for name, row in probe(tower).items():
        print(f"| {name} | {row['probe']:.3f} | {row['top']:.3f} | {row['majority']:.3f} |")


if __name__ == "__main__":
    main()
