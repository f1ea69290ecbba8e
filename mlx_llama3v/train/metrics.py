"""Training metrics: a JSONL log and a loss-curve PNG drawn with Pillow.

One JSON object per line: ``{"step", "loss", "learning_rate", "tokens",
"tokens_per_second", "peak_memory_gb", ...}`` for training steps and ``{"step",
"val_loss"}`` for validations. Floats are written with Python's shortest exact
representation, so a resumed run's losses can be compared bit for bit. On resume
the lines after the checkpoint's step are dropped (they are trained again).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

from ..files import write_atomic, writing

METRICS = "metrics.jsonl"
PLOT = "loss.png"


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Keep only the entries up to ``step`` (a resumed run redoes the rest)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(e) + "\n" for e in kept).encode("utf-8"))

    def write(self, entry: Dict) -> None:
        if not self.enabled:
            return
        with writing(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()


def read_metrics(path: Path) -> List[Dict]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def losses(entries: Sequence[Dict], key: str = "loss") -> List[Tuple[int, float]]:
    return [(e["step"], e[key]) for e in entries if key in e]


# ------------------------------------------------------------------ plotting
W, H, MARGIN = 800, 480, (70, 30, 30, 50)  # left, top, right, bottom
COLORS = {"loss": (31, 119, 180), "val_loss": (214, 39, 40)}


def plot_losses(entries: Sequence[Dict], path: Path) -> Path:
    """Training (blue) and validation (red) loss against the step, as a PNG."""
    series = {k: [(s, v) for s, v in losses(entries, k) if math.isfinite(v)] for k in COLORS}
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts]
    left, top, right, bottom = MARGIN[0], MARGIN[1], W - MARGIN[2], H - MARGIN[3]
    draw.rectangle([left, top, right, bottom], outline="black")
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-3)
        sx = lambda x: left + (x - x0) / (x1 - x0) * (right - left)
        sy = lambda y: bottom - (y - y0) / (y1 - y0) * (bottom - top)
        _axes(draw, (x0, x1, y0, y1), sx, sy, (left, top, right, bottom))
        for key, pts in series.items():
            xy = [(sx(s), sy(v)) for s, v in pts]
            if len(xy) > 1:
                draw.line(xy, fill=COLORS[key], width=2)
            for x, y in xy if len(xy) < 60 or key == "val_loss" else []:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=COLORS[key])
    draw.text((left, 8), "loss (blue: train, red: validation)", fill="black")
    draw.text(((left + right) // 2 - 12, H - 20), "step", fill="black")
    img.save(path)
    return Path(path)


def _axes(draw, bounds, sx, sy, box) -> None:
    x0, x1, y0, y1 = bounds
    left, top, right, bottom = box
    for k in range(5):
        y = y0 + (y1 - y0) * k / 4
        draw.line([(left - 4, sy(y)), (left, sy(y))], fill="black")
        draw.text((4, sy(y) - 6), f"{y:.3g}", fill="black")
        x = x0 + (x1 - x0) * k / 4
        draw.line([(sx(x), bottom), (sx(x), bottom + 4)], fill="black")
        draw.text((sx(x) - 8, bottom + 8), f"{x:.0f}", fill="black")
