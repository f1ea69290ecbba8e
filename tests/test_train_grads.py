"""Gradients against PyTorch: the projector's (stage 1) and the LoRA weights' (stage 2).

The same tiny model (converted from the PyTorch checkpoint that ``hf_checkpoints``
wrote) and the same padded batch of two conversations with sliced images go through
both; the loss is the mean cross-entropy over the assistant tokens. PyTorch computes
the reference with transformers' Idefics2 tower and Llama, the reference resampler
and a hand-written LoRA (y = W x + scale * B A x).
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlx.utils import tree_flatten

from mlx_llama3v.loading import load
from mlx_llama3v.processing import preprocess_image
from mlx_llama3v.train.batching import collate
from mlx_llama3v.train.data import SampleEncoder, load_samples
from mlx_llama3v.train.features import VisionFeatures, project
from mlx_llama3v.train.loop import token_loss
from mlx_llama3v.train.tuning import TuneConfig, parameter_counts, prepare_model
from references import assert_close, strip_nchw

LORA = {"rank": 4, "scale": 1.5, "dropout": 0.0, "keys": None}


@pytest.fixture(scope="module")
def tiny(tiny_setup):
    """The session's tiny model, images and data (conftest.py)."""
    return tiny_setup


def mlx_batch(tiny, stage, lora=LORA):
    model, proc = load(tiny.model)
    mx.random.seed(0)
    prepare_model(model, TuneConfig(stage=stage, lora_parameters=dict(lora)))
    enc = SampleEncoder(proc.tokenizer, proc.config, model.config.projector_config, 2048)
    samples, _ = load_samples([tiny.data], enc)
    batch = collate([samples[0], samples[1]], pad_id=0)  # lengths differ: padding is exercised
    assert batch.samples[0].length != batch.samples[1].length
    return model, proc, batch


def loss_fn(model, batch, groups, n_tiles):
    feats = project(model, groups, n_tiles)
    embeds = model.get_input_embeddings(batch.ids, image_features=feats)
    return token_loss(model, batch.ids, batch.targets, embeds) / batch.num_targets


def torch_loss(tiny, proc, batch):
    ck = tiny.ckpt
    tiles = [t for src in batch.images for t in preprocess_image(src, proc.config).tiles]
    p = ck.patch_size
    x, mask = strip_nchw(tiles, p)
    with torch.no_grad():
        hidden = ck.vision(pixel_values=x, patch_attention_mask=mask).last_hidden_state
    feats = torch.cat(list(ck.projector(hidden, [(t.shape[0] // p, t.shape[1] // p) for t in tiles])))
    ids = torch.from_numpy(batch.ids.astype(np.int64))
    embeds = ck.llm.get_input_embeddings()(ids)
    slots = ids == proc.tokenizer.convert_tokens_to_ids("<unk>")
    index = (slots.reshape(-1).cumsum(0) - 1).clamp(min=0).reshape(ids.shape)
    embeds = torch.where(slots[..., None], feats[index], embeds)
    logits = ck.llm(inputs_embeds=embeds[:, :-1]).logits
    targets = torch.from_numpy(batch.targets[:, 1:])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    return (ce * targets.reshape(-1)).sum() / targets.sum()


def test_projector_gradients_match_pytorch(tiny):
    model, proc, batch = mlx_batch(tiny, "pretrain")
    groups, n = VisionFeatures(model, proc.config)(batch.images)
    loss, grads = nn.value_and_grad(model, loss_fn)(model, batch, groups, n)
    grads = dict(tree_flatten(grads["projector"]))
    ck = tiny.ckpt
    ck.projector.zero_grad()
    for q in ck.llm.parameters():
        q.requires_grad_(False)
    ref = torch_loss(tiny, proc, batch)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    named = dict(ck.projector.named_parameters())
    assert set(grads) == set(named)
    for k, g in grads.items():
        assert_close(g, named[k].grad)
    assert float(mx.abs(grads["kv_proj.weight"]).max()) > 0


def torch_lora(llm, model, keys):
    """Wrap the Llama's linears with LoRA holding the MLX adapters' A and B."""
    params = []
    for i, layer in enumerate(model.language_model.layers):
        for key in keys:
            owner, name = key.split(".")
            lora = getattr(getattr(layer, owner), name)
            base = getattr(getattr(llm.model.layers[i], owner), name)
            a = torch.tensor(np.array(lora.lora_a), requires_grad=True)
            b = torch.tensor(np.array(lora.lora_b), requires_grad=True)
            scale = lora.scale
            hook = lambda mod, inp, out, a=a, b=b, s=scale: out + s * (inp[0] @ a) @ b
            base.register_forward_hook(hook)
            params.append((f"model.layers.{i}.{key}", a, b))
    return params


def test_lora_gradients_match_pytorch(tiny):
    model, proc, batch = mlx_batch(tiny, "sft")
    keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    rng = np.random.default_rng(0)
    for layer in model.language_model.layers:  # B != 0, so A gets a gradient too
        for key in keys:
            owner, name = key.split(".")
            lora = getattr(getattr(layer, owner), name)
            lora.lora_b = mx.array(rng.normal(0, 0.05, lora.lora_b.shape).astype(np.float32))
    groups, n = VisionFeatures(model, proc.config)(batch.images)
    loss, grads = nn.value_and_grad(model, loss_fn)(model, batch, groups, n)
    grads = dict(tree_flatten(grads["language_model"]))
    ck = tiny.ckpt
    for q in list(ck.llm.parameters()) + list(ck.projector.parameters()):
        q.requires_grad_(False)
    lora = torch_lora(ck.llm, model, keys)
    ref = torch_loss(tiny, proc, batch)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert len(grads) == 2 * len(lora) == 2 * 7 * 2
    for name, a, b in lora:
        assert_close(grads[f"{name}.lora_a"], a.grad)
        assert_close(grads[f"{name}.lora_b"], b.grad)


def test_trainable_parameter_counts(tiny):
    model, _ = load(tiny.model)
    prepare_model(model, TuneConfig(stage="pretrain"))
    counts = parameter_counts(model)
    assert counts["projector"] == sum(p.numel() for p in tiny.ckpt.projector.parameters())
    assert counts["trainable"] == counts["projector"] and counts["language_model"] == 0
    cfg = tiny.ckpt.llm.config
    D, I, hd = cfg.hidden_size, cfg.intermediate_size, D_head(cfg)
    kv = cfg.num_key_value_heads * hd
    shapes = {"q": (D, D), "k": (D, kv), "v": (D, kv), "o": (D, D), "gate": (D, I), "up": (D, I), "down": (I, D)}
    for num_layers, keys, r in ((-1, None, 8), (1, ["self_attn.q_proj", "self_attn.v_proj"], 4)):
        model, _ = load(tiny.model)
        prepare_model(model, TuneConfig(num_layers=num_layers, lora_parameters={"rank": r, "scale": 2.0, "dropout": 0.0, "keys": keys}))
        names = ["q", "k", "v", "o", "gate", "up", "down"] if keys is None else ["q", "v"]
        layers = cfg.num_hidden_layers if num_layers < 0 else num_layers
        expected = layers * sum(r * sum(shapes[n]) for n in names)
        assert parameter_counts(model)["language_model"] == expected
        assert parameter_counts(model)["projector"] == 0


def D_head(cfg):
    return cfg.hidden_size // cfg.num_attention_heads
