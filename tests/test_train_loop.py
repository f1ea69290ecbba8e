"""The training loop end to end on the tiny model: what stays frozen, resuming after a
real SIGKILL, QLoRA, divergence, validation and the outputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from mlx_llama3v.loading import load
from mlx_llama3v.train import LoopArgs, TrainConfig, TrainingDiverged, TuneConfig, train
from mlx_llama3v.train.checkpoint import latest_checkpoint
from mlx_llama3v.train.tuning import prepare_model
from test_train_support import REPO, cli_env, llava, read_losses, write_jsonl


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """The session's tiny model, images and data (conftest.py)."""
    return tiny_setup


def config(tiny, out, stage="sft", model=None, **loop):
    loop = {"iters": 4, "batch_size": 4, "learning_rate": 1e-3, "progress": False, **loop}
    return TrainConfig(
        model=str(model or tiny.model),
        data=[str(tiny.data)],
        out=str(out),
        tune=TuneConfig(stage=stage, lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": None}),
        loop=LoopArgs(**loop),
    )


def prepared(tiny, stage):
    model, _ = load(tiny.model)
    mx.random.seed(0)
    prepare_model(model, TuneConfig(stage=stage, lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": None}))
    return model


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_frozen_parts_stay_bit_identical(tiny, tmp_path, stage):
    result = train(config(tiny, tmp_path / stage, stage), log=lambda s: None)
    before = prepared(tiny, stage)
    trainable = set(dict(tree_flatten(before.trainable_parameters())))
    after = dict(tree_flatten(result.model.parameters()))
    changed = 0
    for k, v in tree_flatten(before.parameters()):
        if k in trainable:
            changed += not np.array_equal(np.array(v), np.array(after[k]))
        else:
            assert np.array_equal(np.array(v), np.array(after[k])), f"{k} changed"
    assert changed >= len(trainable) // 2, "training moved the trainable weights"
    part = "projector" if stage == "pretrain" else "language_model"
    assert {k.split(".")[0] for k in trainable} == {part}
    assert result.counts["trainable"] == sum(np.array(v).size for k, v in tree_flatten(before.trainable_parameters()))


@pytest.mark.parametrize("num_layers", [-1, 1])
def test_full_fine_tuning_trains_what_it_says(tiny, num_layers):
    """full over every block trains every language-model weight (embeddings and head
    too); full over the last N blocks trains those blocks only."""
    model, _ = load(tiny.model)
    prepare_model(model, TuneConfig(fine_tune_type="full", num_layers=num_layers))
    trainable = set(dict(tree_flatten(model.trainable_parameters())))
    lm = {"language_model." + k for k, _ in tree_flatten(model.language_model.parameters())}
    if num_layers == -1:
        assert trainable == lm
    else:
        last = f"language_model.model.layers.{len(model.language_model.layers) - 1}."
        assert trainable == {k for k in lm if k.startswith(last)} and trainable


def test_outputs_metrics_and_plot(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "o", iters=6, steps_per_eval=3, steps_per_save=2)
    cfg.valid_fraction = 0.25
    result = train(cfg, log=lambda s: None)
    out = result.out
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["fine_tune_type"] == "lora" and adapter_config["num_layers"] == 2
    assert adapter_config["lora_parameters"]["rank"] == 4
    weights = mx.load(str(out / "adapters.safetensors"))
    assert all(k.startswith("model.layers.") and k.endswith(("lora_a", "lora_b")) for k in weights)
    losses, vals = read_losses(out), read_losses(out, "val_loss")
    assert sorted(losses) == list(range(1, 7)) and sorted(vals) == [3, 6]
    entry = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert entry["tokens_per_second"] > 0 and entry["peak_memory_gb"] > 0 and entry["learning_rate"] > 0
    assert Image.open(out / "loss.png").size == (800, 480)
    assert latest_checkpoint(out).name == "step-0000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000004", "step-0000006"]
    # the adapters apply with mlx-lm's loader through load()
    model, _ = load(tiny.model, adapter_path=str(out))
    assert np.array_equal(np.array(model.language_model.layers[0].self_attn.q_proj.lora_b),
                          np.array(weights["model.layers.0.self_attn.q_proj.lora_b"]))


def test_kill_and_resume_repeats_the_uninterrupted_losses(tiny, tmp_path):
    args = ["-m", tiny.model, "-d", tiny.data, "--iters", "8", "-b", "4", "--lr", "1e-3",
            "--warmup-steps", "2", "--save-every", "3", "--grad-accumulation-steps", "2",
            "--lora-dropout", "0.1", "--no-progress"]
    full = train(_cfg_from(tiny, tmp_path / "full"), log=lambda s: None)
    reference = read_losses(full.out)
    out = tmp_path / "killed"
    hook = str(Path(__file__).with_name("run_with_hook.py"))
    cmd = [sys.executable, hook, "train-pause", "4:60", "mlx_llama3v.train", *map(str, args), "-o", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_step(out, 4, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert latest_checkpoint(out).name == "step-0000003"
    assert max(read_losses(out)) == 4  # step 4 ran but was not checkpointed
    cfg = _cfg_from(tiny, out)
    cfg.resume = True
    train(cfg, log=lambda s: None)
    resumed = read_losses(out)
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(4, 9)] == [reference[s] for s in range(4, 9)]
    a, b = mx.load(str(full.out / "adapters.safetensors")), mx.load(str(out / "adapters.safetensors"))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)


def _cfg_from(tiny, out):
    cfg = config(tiny, out, iters=8, warmup_steps=2, steps_per_save=3, grad_accumulation_steps=2)
    cfg.tune.lora_parameters = {"rank": 8, "scale": 2.0, "dropout": 0.1, "keys": None}
    return cfg


def _wait_for_step(out: Path, step: int, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").exists() and step in read_losses(out):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode()[-3000:])
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"training never reached step {step}")


def test_resume_refuses_other_settings_and_fresh_runs_refuse_a_used_folder(tiny, tmp_path):
    train(config(tiny, tmp_path / "r", iters=2), log=lambda s: None)
    with pytest.raises(ValueError, match="--resume"):
        train(config(tiny, tmp_path / "r", iters=2), log=lambda s: None)
    cfg = config(tiny, tmp_path / "r", iters=3, learning_rate=5e-4)
    cfg.resume = True
    with pytest.raises(ValueError, match="other settings"):
        train(cfg, log=lambda s: None)


def test_qlora_on_a_4bit_model_trains(tiny, tmp_path):
    data = write_jsonl(tiny.root / "two.jsonl", [llava(i) for i in range(2)])
    cfg = config(tiny, tmp_path / "q", model=tiny.model_q4, iters=8, batch_size=2, learning_rate=3e-3)
    cfg.data = [str(data)]
    result = train(cfg, log=lambda s: None)
    q_proj = result.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.linear, nn.QuantizedLinear) and q_proj.linear.bits == 4
    losses = read_losses(result.out)
    first, last = np.mean([losses[s] for s in (1, 2)]), np.mean([losses[s] for s in (7, 8)])
    assert last < 0.7 * first, losses


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny, tmp_path):
    cfg = config(tiny, tmp_path / "nan", iters=10, learning_rate=1e30, steps_per_save=1)
    with pytest.raises(TrainingDiverged, match=r"(loss|gradient norm) (nan|inf) at step (\d+)") as e:
        train(cfg, log=lambda s: None)
    last = latest_checkpoint(tmp_path / "nan")
    assert last is not None and str(last) in str(e.value)
    bad_step = int(str(e.value).split(" at step ")[1].split(":")[0])
    assert last.name == f"step-{bad_step - 1:07d}"
    weights = mx.load(str(last / "adapters.safetensors"))
    assert all(bool(mx.isfinite(v).all()) for v in weights.values())
    assert not (tmp_path / "nan" / "adapters.safetensors").exists()


def test_stage1_from_the_feature_cache_equals_encoding_on_the_fly(tiny, tmp_path):
    from mlx_llama3v.embed import embed

    embed(str(tiny.model), str(tiny.root / "img"), str(tmp_path / "cache"), dtype="float32")
    live = train(config(tiny, tmp_path / "live", "pretrain"), log=lambda s: None)
    cfg = config(tiny, tmp_path / "cached", "pretrain")
    cfg.features = str(tmp_path / "cache")
    cached = train(cfg, log=lambda s: None)
    a, b = read_losses(live.out), read_losses(cached.out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-4)
    assert abs(a[4] - a[1]) > 1e-3  # the projector did train


def test_missing_cache_entry_is_a_bad_sample(tiny, tmp_path):
    from mlx_llama3v.embed import embed

    (tmp_path / "list.txt").write_text(f"{tiny.images[0]}\n")
    embed(str(tiny.model), str(tmp_path / "list.txt"), str(tmp_path / "cache"), dtype="float32")
    cfg = config(tiny, tmp_path / "o", "pretrain", iters=1)
    cfg.features = str(tmp_path / "cache")
    lines = []
    result = train(cfg, log=lines.append)
    assert result.train_report.kept == 2  # the records whose image (0.png) is cached
    assert any("not in the feature cache" in line for line in lines)


def test_gradient_checkpointing_gives_the_same_losses(tiny, tmp_path, monkeypatch):
    from mlx_lm.models.llama import TransformerBlock

    original = TransformerBlock.__call__
    plain = train(config(tiny, tmp_path / "plain", iters=3), log=lambda s: None)
    calls = []
    real = mx.checkpoint
    monkeypatch.setattr(mx, "checkpoint", lambda fn: calls.append(1) or real(fn))
    cfg = config(tiny, tmp_path / "ckpt", iters=3)
    cfg.loop.grad_checkpoint = True
    ckpt = train(cfg, log=lambda s: None)
    assert len(calls) >= 3 * 2  # every block of every step went through mx.checkpoint
    a, b = read_losses(plain.out), read_losses(ckpt.out)
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    assert TransformerBlock.__call__ is original  # mlx-lm's class patch is undone
