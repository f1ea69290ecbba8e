"""Data-parallel training: two ranks under ``mlx.launch --backend ring`` on localhost give
the same losses and adapters as one rank with the same global batch."""

import re
import socket
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_llama3v.train import LoopArgs, TrainConfig, TuneConfig, train
from test_train_support import REPO, cli_env, read_losses

LAUNCH = "from mlx._distributed_utils.launch import main; main()"


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """The session's tiny model, images and data (conftest.py)."""
    return tiny_setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_rank_with_the_same_global_batch(tiny, tmp_path):
    opts = dict(iters=4, batch_size=4, grad_accumulation_steps=2, learning_rate=1e-3, progress=False)
    one = train(
        TrainConfig(
            model=str(tiny.model),
            data=[str(tiny.data)],
            out=str(tmp_path / "one"),
            valid_fraction=0.25,
            tune=TuneConfig(lora_parameters={"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": None}),
            loop=LoopArgs(**opts),
        ),
        log=lambda s: None,
    )
    cmd = [
        sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2",
        "--starting-port", str(free_port()),
        "--env", "OPENBLAS_NUM_THREADS=1",
        sys.executable, "-m", "mlx_llama3v.train",
        "-m", str(tiny.model), "-d", str(tiny.data), "-o", str(tmp_path / "two"),
        "--valid-fraction", "0.25", "--iters", "4", "-b", "4", "--grad-accumulation-steps", "2",
        "--lr", "1e-3", "--lora-rank", "8", "--lora-alpha", "16", "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "over 2 rank(s)" in proc.stderr, proc.stderr[-2000:]
    shares = re.findall(r"rank (\d): read (\d+) training and (\d+) validation", proc.stderr)
    assert sorted(r for r, _, _ in shares) == ["0", "1"], proc.stderr[-2000:]
    assert sum(int(t) for _, t, _ in shares) == one.train_report.kept  # each read only its share
    assert sum(int(v) for _, _, v in shares) == one.valid_report.kept
    assert all(0 < int(t) < one.train_report.kept for _, t, _ in shares)
    a, b = read_losses(one.out), read_losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    va, vb = read_losses(one.out, "val_loss"), read_losses(tmp_path / "two", "val_loss")
    np.testing.assert_allclose(vb[4], va[4], rtol=1e-5)
    wa = mx.load(str(one.out / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert set(wa) == set(wb)
    # Adam divides by sqrt(v): a gradient summed in another order moves a weight by a
    # small fraction of one step (lr = 1e-3), not more
    for k in wa:
        np.testing.assert_allclose(np.array(wb[k]), np.array(wa[k]), atol=2e-5, rtol=0)
