"""Shared pieces of the training tests (no tests here): a tiny converted model with its
PyTorch reference, images, data files, and helpers to run the training command.

The model is the tiny MiniCPM-Llama3-V 2.5 of ``hf_checkpoints`` (NaViT tower,
resampler with 8 queries, a 2-layer Llama of width 256), converted in float32, and
its 4-bit conversion for QLoRA. Its 16 px slicing resolution splits the 40 x 28 px
test images into several tiles, so every sample carries a few image spans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
from PIL import Image

from hf_checkpoints import make_minicpm
from mlx_llama3v.convert import convert

REPO = Path(__file__).resolve().parents[1]
ANSWERS = [
    "The image shows a small red house.",
    "There are two cats on a table.",
    "A yellow car in front of the station.",
    "Three people walking along the street.",
    "A tall green tree next to a house.",
    "The sky is blue and the sun is shining.",
]


class TinySetup:
    """Built once per session: checkpoints, conversions, images and a data file."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpt = make_minicpm(root / "hf")
        self.model = convert(hf_path=str(self.ckpt.path), mlx_path=root / "mlx", dtype="float32")
        self._q4 = None
        self.images = write_images(root / "img", 6)
        self.data = write_jsonl(root / "train.jsonl", mixed_records(12))

    @property
    def model_q4(self) -> Path:
        if self._q4 is None:
            self._q4 = convert(
                hf_path=str(self.ckpt.path),
                mlx_path=self.root / "mlx-q4",
                dtype="float32",
                quantize=True,
                q_bits=4,
                q_group_size=64,
            )
        return self._q4


def write_images(folder: Path, n: int) -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        pixels = rng.integers(0, 256, (28 + 4 * (i % 3), 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def llava(i: int, question="What is in this image?", answer=None, image=None) -> dict:
    return {
        "id": str(i),
        "image": image or f"img/{i % 6}.png",
        "conversations": [
            {"from": "human", "value": f"<image>\n{question}"},
            {"from": "gpt", "value": answer or ANSWERS[i % 6]},
        ],
    }


def chat(i: int) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"img/{i % 6}.png"}},
                    {"type": "text", "text": "Describe the picture."},
                ],
            },
            {"role": "assistant", "content": ANSWERS[i % 6]},
            {"role": "user", "content": "How many are there?"},
            {"role": "assistant", "content": "Two."},
        ]
    }


def mixed_records(n: int) -> List[dict]:
    return [llava(i) if i % 2 else chat(i) for i in range(n)]


def write_jsonl(path: Path, records, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def run_cli(*args, env=None, check=True, timeout=300) -> subprocess.CompletedProcess:
    """``python -m mlx_llama3v.train`` in a real process, this checkout first on the path."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_llama3v.train", *map(str, args)],
        cwd=REPO,
        env=cli_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr[-3000:]}")
    return proc


def cli_env(extra=None) -> dict:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env.update(extra or {})
    return env


def read_losses(out: Path, key: str = "loss") -> dict:
    entries = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x]
    return {e["step"]: e[key] for e in entries if key in e}
