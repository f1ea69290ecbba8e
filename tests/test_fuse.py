"""``mlx_llama3v.fuse``: adapters (LoRA, DoRA, full) and a retrained projector merged into
a folder that ``load()`` opens and that computes what the base + adapters compute."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from typer.testing import CliRunner

from mlx_llama3v.fuse import app, fuse
from mlx_llama3v.loading import load
from mlx_llama3v.train.tuning import TuneConfig, load_projector, prepare_model, save_outputs
from references import assert_close

QUESTION = [{"role": "user", "content": "What is in this image?"}]


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """The session's tiny model, images and data (conftest.py)."""
    return tiny_setup


def make_adapters(model_path, folder, **tune):
    """Adapters with random, non-zero weights, saved as training saves them."""
    model, _ = load(model_path)
    mx.random.seed(0)
    config = TuneConfig(lora_parameters={"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": None}, **tune)
    prepare_model(model, config)
    rng = np.random.default_rng(1)
    for name, p in tree_flatten(model.trainable_parameters()):
        noise = mx.array(rng.normal(0, 0.02, p.shape).astype(np.float32))
        model.update(tree_unflatten([(name, p + noise)]))
    save_outputs(model, config, folder, {"note": "test"})
    return folder


def logits(model, processor, image):
    inputs = processor(QUESTION, images=[image])
    return np.array(model(inputs.input_ids[None], tiles=inputs.tiles))


def with_adapters(model_path, folder):
    model, processor = load(model_path, adapter_path=str(folder) if (folder / "adapter_config.json").exists() else None)
    if (folder / "projector.safetensors").exists():
        load_projector(model, folder / "projector.safetensors")
    return model, processor


@pytest.mark.parametrize(
    "tune",
    [dict(), dict(fine_tune_type="dora", train_projector=True), dict(fine_tune_type="full", num_layers=1),
     dict(stage="pretrain")],
    ids=["lora", "dora+projector", "full", "projector-only"],
)
def test_fused_model_computes_what_base_plus_adapters_compute(tiny, tmp_path, tune):
    adapters = make_adapters(tiny.model, tmp_path / "adapters", **tune)
    out = fuse(str(tiny.model), str(adapters), str(tmp_path / "fused"))
    image = tiny.images[0]
    expected = logits(*with_adapters(tiny.model, adapters), image)
    fused, processor = load(out)
    assert not any("lora" in k for k, _ in fused.named_modules())
    got = logits(fused, processor, image)
    assert_close(got, expected)
    base = logits(*load(tiny.model), image)
    assert np.abs(base - expected).max() > 1e-3 * np.abs(base).max()  # the adapters matter


def test_qlora_fuse_keeps_or_drops_quantization(tiny, tmp_path):
    adapters = make_adapters(tiny.model_q4, tmp_path / "adapters")
    image = tiny.images[1]
    expected = logits(*with_adapters(tiny.model_q4, adapters), image)
    kept = fuse(str(tiny.model_q4), str(adapters), str(tmp_path / "q"))
    model, processor = load(kept)
    assert isinstance(model.language_model.layers[0].mlp.up_proj, nn.QuantizedLinear)
    assert json.loads((kept / "config.json").read_text())["quantization"]["bits"] == 4
    plain = fuse(str(tiny.model_q4), str(adapters), str(tmp_path / "f"), dequantize=True)
    model, processor = load(plain)
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    assert "quantization" not in json.loads((plain / "config.json").read_text())
    assert_close(logits(model, processor, image), expected)


def test_command_line_errors_are_one_line(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["-m", str(tiny.model), "--adapter-path", str(tmp_path / "empty"),
                                      "--save-path", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "not an adapter folder" in result.stderr
    adapters = make_adapters(tiny.model, tmp_path / "adapters")
    (tmp_path / "taken").mkdir()
    args = ["-m", str(tiny.model), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "taken")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "already exists" in result.stderr
    result = CliRunner().invoke(app, args + ["--force"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "taken" / "config.json").exists()


def test_fuse_from_a_hub_id_copies_the_converted_tokenizer(tiny, tmp_path, monkeypatch):
    """``--model <hub id>``: the download is converted into the cache first; the fused
    folder takes that conversion's tokenizer and config, not the raw download's."""
    import mlx_llama3v.loading as loading

    repo = "openbmb/MiniCPM-Llama3-V-2_5"
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "download", lambda name: tiny.ckpt.path if name == repo else 1 / 0)
    adapters = make_adapters(tiny.model, tmp_path / "adapters")
    result = CliRunner().invoke(app, ["-m", repo, "--adapter-path", str(adapters), "--save-path", str(tmp_path / "f")])
    assert result.exit_code == 0, result.stderr
    out, converted = tmp_path / "f", tmp_path / "cache" / repo.replace("/", "--")
    assert (converted / "config.json").exists(), "the download was converted into the cache"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (converted / name).exists():
            assert (out / name).read_bytes() == (converted / name).read_bytes(), name
    raw = json.loads((tiny.ckpt.path / "tokenizer_config.json").read_text())
    fused_config = json.loads((out / "tokenizer_config.json").read_text())
    assert raw["tokenizer_class"] == "MiniCPMVTokenizerFast" and "auto_map" in raw
    assert fused_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in fused_config
    assert not list(out.glob("*.py")), "no remote code in the fused folder"
    image = tiny.images[2]
    expected = logits(*with_adapters(converted, adapters), image)
    # the cache conversion is float16: fusing rounds the merged weights to float16
    assert_close(logits(*load(out), image), expected, tol=1e-2)
