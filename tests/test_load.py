"""``loading.load``: converted folders (strictly), checkpoints converted on the fly, processor."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from PIL import Image

import mlx_llama3v.convert as convert_module
from hf_checkpoints import make_bunny, make_minicpm
from mlx_llama3v.convert import convert
from mlx_llama3v.loading import CACHE_ENV, Processor, load
from mlx_llama3v.models.llama3v import Model
from references import assert_close

QUESTION = [{"role": "user", "content": "Describe the picture."}]
IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def bunny(tmp_path_factory):
    root = tmp_path_factory.mktemp("bunny")
    ckpt = make_bunny(root / "hf")
    return ckpt, convert(str(ckpt.path), root / "mlx", dtype="float32")


def logits_of(model, processor, image=IMAGE):
    inputs = processor(QUESTION, images=[image])
    return np.array(model(inputs.input_ids[None], tiles=inputs.tiles).astype(mx.float32))


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    weights = edit(dict(mx.load(str(path))))
    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def test_load_returns_the_model_and_its_processor(bunny):
    ckpt, out = bunny
    model, processor = load(out)
    assert isinstance(model, Model) and isinstance(processor, Processor)
    from transformers import PreTrainedTokenizerFast

    assert isinstance(processor.tokenizer, PreTrainedTokenizerFast)
    config = json.loads((out / "config.json").read_text())
    assert processor.config == config["processor_config"]
    assert model.config.image_token_id == config["image_token_id"]
    inputs = processor(QUESTION, images=[IMAGE])
    assert (inputs.input_ids == config["image_token_id"]).sum() == config["processor_config"][
        "tokens_per_tile"
    ]
    ref = ckpt.logits(inputs.input_ids, inputs.tiles, inputs.image_token_id)
    assert_close(model(inputs.input_ids[None], tiles=inputs.tiles), ref)


def test_loading_is_strict_about_missing_tensors(bunny, tmp_path):
    out = Path(shutil.copytree(bunny[1], tmp_path / "m"))
    rewrite_weights(out, lambda w: {k: v for k, v in w.items() if k != "projector.layers.2.bias"})
    with pytest.raises(ValueError, match=r"(?s)Missing 1 parameters.*projector\.layers\.2\.bias"):
        load(out)


def test_loading_is_strict_about_leftover_tensors(bunny, tmp_path):
    out = Path(shutil.copytree(bunny[1], tmp_path / "m"))
    rewrite_weights(out, lambda w: {**w, "vision_tower.head.probe": mx.zeros((1, 32))})
    with pytest.raises(ValueError, match=r"(?s)not in model.*vision_tower\.head\.probe"):
        load(out)


def test_quantized_layers_are_restored(bunny, tmp_path):
    ckpt = bunny[0]
    out = convert(
        str(ckpt.path),
        tmp_path / "q",
        dtype="float32",
        quantize=True,
        q_bits=8,
        q_group_size=32,
        quantize_vision=True,
    )
    model, processor = load(out)
    assert isinstance(model.language_model.model.layers[1].self_attn.q_proj, nn.QuantizedLinear)
    assert isinstance(model.vision_tower.encoder.layers[0].mlp.fc1, nn.QuantizedLinear)
    assert type(model.projector.layers[0]) is nn.Linear  # projector not asked for
    float_model, _ = load(bunny[1])
    ref = logits_of(float_model, processor)
    assert np.abs(logits_of(model, processor) - ref).max() <= 0.05 * np.abs(ref).max()


def test_a_checkpoint_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    ckpt = make_minicpm(tmp_path / "MiniCPM-Llama3-V-2_5")  # ships remote code that must not run
    model, processor = load(str(ckpt.path))
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.startswith("MiniCPM-Llama3-V-2_5-")
    assert json.loads((cached[0] / "config.json").read_text())["family"] == "minicpm_v2_5"
    inputs = processor(QUESTION, images=[IMAGE])
    ref = ckpt.logits(inputs.input_ids, inputs.tiles, inputs.image_token_id)
    assert_close(
        model(inputs.input_ids[None], tiles=inputs.tiles).astype(mx.float32), ref, tol=1e-2
    )  # float16

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached conversion should be reused")

    monkeypatch.setattr(convert_module, "convert", no_conversion)
    again, _ = load(str(ckpt.path))
    assert isinstance(again, Model)


def test_a_missing_adapter_folder_is_one_clear_error(bunny):
    from mlx_llama3v.loading import AdapterError

    with pytest.raises(AdapterError, match="adapter folder not found"):
        load(bunny[1], adapter_path="adapters")
