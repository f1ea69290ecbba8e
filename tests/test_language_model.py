"""mlx-lm's Llama (reused, not rewritten) against transformers' LlamaForCausalLM."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from mlx_llama3v.config import TextConfig, normalize_text_config
from hf_checkpoints import ROPE_31  # a copy: transformers edits LLAMA31_ROPE when given it
from references import LLAMA31_ROPE, TEXT, assert_close, hf_llama, to_mlx


def mlx_llama(hf_model, hf_config):
    # the config as transformers >= 5 writes it (rope_parameters), as a converter sees it
    model = llama.Model(TextConfig.from_dict(normalize_text_config(hf_config.to_dict())))
    model.load_weights(list(model.sanitize(to_mlx(hf_model.state_dict())).items()), strict=True)
    return model


@pytest.mark.parametrize("rope_scaling", [None, LLAMA31_ROPE], ids=["llama3", "llama3.1-rope"])
def test_llama_logits_match_transformers(rope_scaling):
    hf, cfg = hf_llama(rope_scaling=rope_scaling)
    model = mlx_llama(hf, cfg)
    if rope_scaling:
        assert model.args.rope_scaling["rope_type"] == "llama3"
    ids = np.random.default_rng(0).integers(0, TEXT["vocab_size"], (2, 48))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits
    assert_close(model(mx.array(ids)), ref)


def test_rope_scaling_changes_the_result():
    # guards the test above: with positions past original_max_position_embeddings
    # the llama3 scaling must matter, or that test would not check it
    hf, cfg = hf_llama(rope_scaling=LLAMA31_ROPE)
    plain = hf_llama(rope_scaling=None)[0]
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, TEXT["vocab_size"], (1, 48)))
    with torch.no_grad():
        assert (hf(ids).logits - plain(ids).logits).abs().max() > 1e-3


def test_legacy_rope_keys_are_read():
    cfg = normalize_text_config(dict(TEXT, rope_theta=5e5, rope_scaling=LLAMA31_ROPE))
    assert cfg["rope_theta"] == 5e5 and cfg["rope_scaling"] == ROPE_31
    new = normalize_text_config(
        dict(TEXT, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    )
    assert new["rope_theta"] == 5e5 and "rope_scaling" not in new


def test_cached_decode_equals_full_forward():
    hf, cfg = hf_llama(rope_scaling=LLAMA31_ROPE)
    model = mlx_llama(hf, cfg)
    ids = mx.array(np.random.default_rng(2).integers(0, TEXT["vocab_size"], (1, 30)))
    full = model(ids)
    cache = make_prompt_cache(model)
    steps = [model(ids[:, :20], cache=cache)]
    steps += [model(ids[:, i : i + 1], cache=cache) for i in range(20, 30)]
    assert_close(mx.concatenate(steps, axis=1), np.array(full))


def test_every_rope_schema_gives_one_form():
    """4.x top-level keys (``type`` or ``rope_type``) and 5.x ``rope_parameters``."""
    scaled = {k: v for k, v in ROPE_31.items() if k != "rope_type"}
    forms = [
        dict(TEXT, rope_scaling=dict(ROPE_31)),
        dict(TEXT, rope_scaling=dict(scaled, type="llama3")),
        dict(TEXT, rope_scaling=dict(scaled, type="llama3", rope_type="llama3")),
        {
            **{k: v for k, v in TEXT.items() if k != "rope_theta"},
            "rope_parameters": dict(ROPE_31, rope_theta=TEXT["rope_theta"]),
        },
        dict(TEXT, rope_parameters=dict(ROPE_31, rope_theta=TEXT["rope_theta"])),
    ]
    out = [normalize_text_config(f) for f in forms]
    assert all(o == out[0] for o in out), out
    assert out[0]["rope_scaling"] == ROPE_31 and out[0]["rope_theta"] == 5e5
    assert normalize_text_config(out[0]) == out[0]  # a fixed point
    plain = [
        dict(TEXT, rope_scaling=None),
        dict(TEXT, rope_scaling={"rope_type": "default"}),
        {
            **{k: v for k, v in TEXT.items() if k != "rope_theta"},
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e5},
        },
    ]
    assert all("rope_scaling" not in normalize_text_config(f) for f in plain)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(rope_theta=None), "no rope_theta given"),
        (
            dict(rms_norm_eps=None, num_key_value_heads=None),
            "no num_key_value_heads, rms_norm_eps given",
        ),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "disagree"),
        (dict(rope_scaling={"type": "linear", "rope_type": "llama3", "factor": 2.0}), "disagree"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks low_freq_factor"),
        (dict(rope_scaling={"rope_type": "su", "factor": 8.0}), "'su' is not supported"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ],
)
def test_missing_or_contradictory_rope_and_norm_settings_are_errors(change, message):
    cfg = {k: v for k, v in {**TEXT, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        normalize_text_config(cfg)


def test_missing_fields_come_from_the_tensors_then_the_published_values():
    cfg = {k: v for k, v in TEXT.items() if k not in ("rope_theta", "rms_norm_eps", "vocab_size")}
    out = normalize_text_config(
        cfg,
        derived={"vocab_size": 77},
        published={"vocab_size": 1, "rope_theta": 5e5, "rms_norm_eps": 1e-5},
    )
    assert (out["vocab_size"], out["rope_theta"], out["rms_norm_eps"]) == (77, 5e5, 1e-5)
    assert (
        normalize_text_config(TEXT, published={"rope_theta": 1.0})["rope_theta"]
        == TEXT["rope_theta"]
    )
