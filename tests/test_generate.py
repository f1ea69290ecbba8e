"""Generation: the Python API and the ``mlx_llama3v.generate`` command.

Tiny random checkpoints of each family (``hf_checkpoints``) are converted and loaded;
greedy generation must give the same tokens as a greedy loop over the PyTorch
reference of the published pipeline (transformers' ``LlamaForCausalLM`` fed
``inputs_embeds`` with the reference image features spliced in), for prompts with 0, 1
and 2 images and for a follow-up turn that reuses the KV cache and the image-feature
cache. Then: streaming, stop strings, end tokens, ``max_tokens``, the context limit,
the caches, LoRA adapters, and the command line (end to end in a subprocess, and one
``error:`` line with exit status 2 for each kind of bad input).
"""

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx_lm.models.cache import QuantizedKVCache
from PIL import Image
from typer.testing import CliRunner

from hf_checkpoints import (
    EOS,
    EOT,
    attention_projector_from,
    make_bunny,
    make_composed,
    make_minicpm,
)
from mlx_llama3v import generate, load, stream_generate
from mlx_llama3v.chat import ChatSession
from mlx_llama3v.convert import convert
from mlx_llama3v.generation.generate import ContextError, PromptCache, app
from mlx_llama3v.generation.features import ImageFeatureCache, feature_cache
from mlx_llama3v.generation.prompt_cache import token_keys
from mlx_llama3v.generation.text import end_token_ids
from mlx_llama3v.loading import AdapterError
from mlx_llama3v.models.llama3v import Model
from tiny_tokenizer import make_llama3_tokenizer, special_id

RNG = np.random.default_rng(0)
# MiniCPM's tiny slicing resolution is 16 px: both images are sliced into several tiles
IMAGE_A = Image.fromarray(RNG.integers(0, 256, (28, 40, 3), dtype=np.uint8))
IMAGE_B = Image.fromarray(RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8))
QUESTIONS = ["What is in this image?", "Describe the picture in detail.", "Tell me a story."]
FAMILIES = ["minicpm_v2_5", "siglip_llama3", "bunny"]
N = 12  # greedy tokens compared with the reference


# ------------------------------------------------------------------ fixtures
class Tiny:
    """Converted tiny models of each family and their PyTorch references, built once."""

    def __init__(self, root: Path):
        self.root = root
        self.built = {}

    def get(self, family):
        if family not in self.built:
            self.built[family] = self._build(family)
        return self.built[family]

    def _build(self, family):
        root = self.root / family
        out = root / "mlx"
        if family == "siglip_llama3":
            ckpt = make_composed(root / "hf")
            convert(
                vision=str(ckpt.extra["vision"]),
                llm=str(ckpt.extra["llm"]),
                mlx_path=out,
                dtype="float32",
            )
            ckpt.projector = attention_projector_from(mx.load(str(out / "model.safetensors")))
        elif family == "bunny":
            ckpt = make_bunny(root / "hf")
            convert(str(ckpt.path), out, dtype="float32")
        else:  # the released Llama 3-V naming of MiniCPM-Llama3-V 2.5
            ckpt = make_minicpm(root / "hf", variant="llama3v")
            convert(str(ckpt.path), out, dtype="float32")
        model, processor = load(out)
        return ckpt, out, model, processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("generate"))


@pytest.fixture
def minicpm(tiny):
    """The MiniCPM family model with an empty image-feature cache."""
    ckpt, out, model, processor = tiny.get("minicpm_v2_5")
    feature_cache(model).clear()
    return ckpt, out, model, processor


@pytest.fixture
def vision_calls(monkeypatch):
    """Tiles passed to the vision tower, call by call."""
    calls = []
    encode = Model.encode_images

    def counting(self, tiles):
        calls.append(len(tiles))
        return encode(self, tiles)

    monkeypatch.setattr(Model, "encode_images", counting)
    return calls


# ------------------------------------------------------------------ the PyTorch reference
def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


def _cache_kwarg(llm):
    # transformers >= 5.2x names the KV cache argument "cache"
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


@torch.no_grad()
def reference_greedy(ckpt, inputs, n=N, end=(EOS, EOT)):
    """Greedy tokens of the published pipeline: reference features in the embeddings, KV cache on."""
    ids = torch.from_numpy(inputs.input_ids.astype(np.int64))[None]
    embeds = ckpt.llm.get_input_embeddings()(ids)
    if inputs.tiles:
        embeds[ids == inputs.image_token_id] = torch.cat(ckpt.features(inputs.tiles))
    out = ckpt.llm(inputs_embeds=embeds, use_cache=True)
    tokens = []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        if tokens[-1] in end:
            break
        step = torch.tensor([[tokens[-1]]])
        out = ckpt.llm(input_ids=step, use_cache=True, **{_cache_kwarg(ckpt.llm): _cache_of(out)})
    return tokens


def user(question, images=()):
    return {
        "role": "user",
        "content": [{"type": "image", "image": i} for i in images]
        + [{"type": "text", "text": question}],
    }


# ------------------------------------------------------------------ parity with PyTorch
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_the_pytorch_reference(tiny, family):
    ckpt, _, model, processor = tiny.get(family)
    lengths = []
    for n_images, question in enumerate(QUESTIONS):  # 0, 1 and 2 images
        images = [IMAGE_A, IMAGE_B][:n_images]
        inputs = processor([user(question)], images)
        expected = reference_greedy(ckpt, inputs)
        result = generate(model, processor, question, images=images, max_tokens=N)
        assert result.tokens == expected, (n_images, question)
        assert result.image_tiles == len(inputs.tiles) >= n_images
        lengths.append(len(expected))
    assert max(lengths) == N, "every prompt ended at once: the comparison is too short"


@pytest.mark.parametrize("family", FAMILIES)
def test_follow_up_reuses_the_kv_cache_and_the_image_features(tiny, family, vision_calls):
    ckpt, _, model, processor = tiny.get(family)
    feature_cache(model).clear()
    chat = ChatSession(model, processor, max_tokens=N)
    first = chat.ask("What is in this image?", images=[IMAGE_A])
    assert vision_calls and sum(vision_calls) == first.image_tiles == first.tiles_encoded
    encoded = len(vision_calls)

    second = chat.ask("Describe the picture in detail.")
    messages = [
        user("What is in this image?", [IMAGE_A]),
        {"role": "assistant", "content": first.text},
        user("Describe the picture in detail."),
    ]
    inputs = processor(messages)
    assert second.tokens == reference_greedy(ckpt, inputs)
    assert len(vision_calls) == encoded, "the follow-up ran the vision tower again"
    assert second.tiles_encoded == 0 and second.image_tiles == first.image_tiles
    # only the new turn was prefilled: the first prompt and answer came from the KV cache
    assert second.cached_tokens >= len(processor([messages[0]]).input_ids)
    assert second.prompt_tokens + second.cached_tokens == len(inputs.input_ids)


def test_a_new_image_at_cached_placeholder_positions_is_not_taken_from_the_kv_cache(minicpm):
    # the placeholder ids of two same-sized images are identical: the cache must tell them apart
    ckpt, _, model, processor = minicpm
    flipped = IMAGE_A.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    cache = PromptCache(model)
    generate(
        model,
        processor,
        "What is in this image?",
        images=[IMAGE_A],
        max_tokens=4,
        prompt_cache=cache,
    )
    result = generate(
        model,
        processor,
        "What is in this image?",
        images=[flipped],
        max_tokens=N,
        prompt_cache=cache,
    )
    inputs = processor([user("What is in this image?")], [flipped])
    assert result.tokens == reference_greedy(ckpt, inputs)
    first_slot = int(np.flatnonzero(inputs.input_ids == inputs.image_token_id)[0])
    assert result.cached_tokens == first_slot


def test_the_same_image_again_skips_the_vision_tower(minicpm, vision_calls):
    _, _, model, processor = minicpm
    a = generate(model, processor, "What is in this image?", images=[IMAGE_A], max_tokens=3)
    b = generate(model, processor, "Tell me a story.", images=[IMAGE_A.copy()], max_tokens=3)
    c = generate(model, processor, "Tell me a story.", images=[IMAGE_A, IMAGE_B], max_tokens=3)
    assert (a.tiles_encoded, b.tiles_encoded) == (a.image_tiles, 0)
    assert c.tiles_encoded == c.image_tiles - a.image_tiles  # only IMAGE_B's tiles
    assert vision_calls == [a.image_tiles, c.tiles_encoded]


def test_feature_cache_is_bounded_by_bytes():
    cache = ImageFeatureCache(max_bytes=3 * 400)
    for key in "abcd":
        cache.put(key, mx.zeros((100,), dtype=mx.float32))  # 400 bytes each
    assert len(cache) == 3 and "a" not in cache and cache.nbytes == 1200
    cache.get("b")  # now the most recently used
    cache.put("e", mx.zeros((100,)))
    assert "b" in cache and "c" not in cache
    cache.put("huge", mx.zeros((1000,)))
    assert "huge" not in cache and len(cache) == 3


def test_token_keys_name_the_tile_of_each_placeholder():
    ids = np.array([1, 7, 7, 2, 7, 7, 3])
    assert token_keys(ids, 7, ["x", "y"], 2) == [1, "x", "x", 2, "y", "y", 3]


# ------------------------------------------------------------------ streaming and stopping
def test_streaming_gives_the_same_text_as_generate(minicpm):
    _, _, model, processor = minicpm
    pieces = list(
        stream_generate(model, processor, "Tell me a story.", images=[IMAGE_A], max_tokens=N)
    )
    result = generate(model, processor, "Tell me a story.", images=[IMAGE_A], max_tokens=N)
    assert "".join(p.text for p in pieces) == result.text
    assert [p.token for p in pieces] == result.tokens
    assert sum(1 for p in pieces if p.text) > 1, "the text did not stream"
    assert [p.finish_reason for p in pieces[:-1]] == [None] * (len(pieces) - 1)
    assert pieces[-1].finish_reason == result.finish_reason == "length"
    assert result.text == processor.tokenizer.decode(result.tokens)


def test_stop_strings_stop_and_are_not_emitted(minicpm):
    _, _, model, processor = minicpm
    full = generate(model, processor, "Tell me a story.", max_tokens=N)
    stop = full.text[len(full.text) // 2 :][:2]
    expected = full.text[: full.text.index(stop)]
    pieces = list(stream_generate(model, processor, "Tell me a story.", max_tokens=N, stop=[stop]))
    assert "".join(p.text for p in pieces) == expected
    assert pieces[-1].finish_reason == "stop"
    assert len(pieces) < N


def test_end_tokens_stop(minicpm):
    _, _, model, processor = minicpm
    eot = special_id("<|eot_id|>")

    def end_after_three(tokens, logits):  # the prompt is in ``tokens`` too
        return logits if len(tokens) < prompt_len + 3 else logits.at[:, eot].add(1e4)

    prompt_len = len(processor([user("Tell me a story.")]).input_ids)
    result = generate(
        model, processor, "Tell me a story.", max_tokens=N, logits_processors=[end_after_three]
    )
    assert result.tokens[-1] == eot and len(result.tokens) == 4
    assert result.finish_reason == "stop" and "<|eot_id|>" not in result.text


def test_end_tokens_come_from_the_tokenizer_and_the_model_configs(tmp_path):
    from transformers import PreTrainedTokenizerFast

    make_llama3_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [500, 501]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 502}))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    ids = end_token_ids(tokenizer)
    assert ids == {special_id("<|eot_id|>"), special_id("<|end_of_text|>"), 500, 501, 502}


def test_max_tokens_holds(minicpm):
    _, _, model, processor = minicpm
    for n in (1, 5):
        result = generate(model, processor, "Tell me a story.", images=[IMAGE_A], max_tokens=n)
        assert len(result.tokens) == result.generation_tokens == n
        assert result.finish_reason == "length"


def test_sampling_is_seeded(minicpm):
    _, _, model, processor = minicpm
    kw = dict(max_tokens=8, temp=1.0, top_p=0.9, top_k=50, min_p=0.01, repetition_penalty=1.1)
    a = generate(model, processor, "Tell me a story.", seed=3, **kw).tokens
    b = generate(model, processor, "Tell me a story.", seed=3, **kw).tokens
    greedy = generate(model, processor, "Tell me a story.", max_tokens=8).tokens
    samples = {
        tuple(generate(model, processor, "Tell me a story.", seed=s, **kw).tokens) for s in range(4)
    }
    assert a == b and len(samples) > 1 and greedy != a


def test_kv_cache_options(minicpm):
    _, _, model, processor = minicpm
    question = "What is in this image?"
    greedy = generate(model, processor, question, images=[IMAGE_A], max_tokens=N).tokens
    cache = PromptCache(model)
    q8 = generate(
        model,
        processor,
        question,
        images=[IMAGE_A],
        max_tokens=N,
        kv_bits=8,
        quantized_kv_start=0,
        prompt_cache=cache,
    )
    assert len(q8.tokens) == N and isinstance(cache.layers[0], QuantizedKVCache)
    # a rotating cache that never wraps, and chunked prefill, change nothing
    rotating = generate(
        model,
        processor,
        question,
        images=[IMAGE_A],
        max_tokens=N,
        max_kv_size=4096,
        prefill_step_size=16,
    )
    assert rotating.tokens == greedy
    with pytest.raises(ValueError, match="kv_bits"):
        generate(model, processor, "Hi", kv_bits=4, max_kv_size=64)


def test_the_context_limits_the_prompt_and_the_answer(minicpm, monkeypatch):
    _, _, model, processor = minicpm
    n = len(processor([user("Tell me a story.")]).input_ids)
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", n + 3)
    assert len(generate(model, processor, "Tell me a story.", max_tokens=N).tokens) == 3
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", n)
    with pytest.raises(ContextError, match=f"the prompt is {n} tokens"):
        generate(model, processor, "Tell me a story.")


# ------------------------------------------------------------------ adapters
def write_adapter(
    folder: Path, model, rank=4, scale=2.0, seed=0, keys=("self_attn.q_proj", "mlp.down_proj")
):
    """An mlx-lm LoRA adapter folder with random A and B for the last layer of ``model``."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config = {
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": list(keys)},
    }
    linear_to_lora_layers(model.language_model, 1, config["lora_parameters"])
    rng = np.random.default_rng(seed)
    weights = {
        k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
        for k, v in tree_flatten(model.language_model.parameters())
        if k.endswith(("lora_a", "lora_b"))
    }
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "adapters.safetensors"), weights)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return weights


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    _, out, _, _ = tiny.get("minicpm_v2_5")
    folder = tmp_path_factory.mktemp("adapter")
    scratch, _ = load(out)
    return folder, write_adapter(folder, scratch)


def test_lora_adapters_apply_to_the_language_model(tiny, adapter):
    _, out, base, processor = tiny.get("minicpm_v2_5")
    folder, weights = adapter
    adapted, _ = load(out, adapter_path=str(folder))
    fused, _ = load(out)
    last = len(fused.language_model.layers) - 1
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        prefix = f"model.layers.{last}.{name}"
        linear = fused.language_model.model.layers[last]
        for part in name.split("."):
            linear = getattr(linear, part)
        delta = 2.0 * (weights[f"{prefix}.lora_a"] @ weights[f"{prefix}.lora_b"]).T
        linear.weight = linear.weight + delta
    inputs = processor([user("What is in this image?")], [IMAGE_A])
    logits = lambda m: np.array(m(inputs.input_ids[None], tiles=inputs.tiles))
    np.testing.assert_allclose(logits(adapted), logits(fused), rtol=1e-4, atol=1e-4)
    assert np.abs(logits(adapted) - logits(base)).max() > 1e-3


def write_misfit_adapter(folder: Path, out: Path) -> None:
    """Rank-8 tensors under a rank-4 config: every LoRA shape is wrong for the model."""
    write_adapter(folder, load(out)[0], rank=8)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 4
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_an_adapter_that_does_not_fit_is_refused_in_one_line(tiny, tmp_path):
    _, out, _, _ = tiny.get("minicpm_v2_5")
    write_misfit_adapter(tmp_path / "wide", out)
    with pytest.raises(AdapterError) as e:
        load(out, adapter_path=str(tmp_path / "wide"))
    message = str(e.value)
    assert "\n" not in message and "does not fit the model" in message, message
    assert re.search(
        r"lora_[ab]: adapter shape \(.*8.*\) does not match model parameter shape .*\(and 3 more\)$",
        message,
    ), message
    with pytest.raises(AdapterError, match="adapter folder not found"):
        load(out, adapter_path=str(tmp_path / "missing"))


def test_a_trained_projector_in_the_adapter_folder_is_loaded(tiny, tmp_path):
    from mlx.utils import tree_flatten

    _, out, base, processor = tiny.get("minicpm_v2_5")
    trained = {k: v * 1.5 for k, v in tree_flatten(base.projector.parameters())}
    folder = tmp_path / "stage1"
    folder.mkdir()
    mx.save_safetensors(str(folder / "projector.safetensors"), trained)
    model, _ = load(out, adapter_path=str(folder))
    loaded = dict(tree_flatten(model.projector.parameters()))
    assert all(np.array_equal(np.array(loaded[k]), np.array(v)) for k, v in trained.items())
    generate(base, processor, "What is in this image?", images=[IMAGE_A], max_tokens=1)
    result = generate(model, processor, "What is in this image?", images=[IMAGE_A], max_tokens=1)
    assert result.tiles_encoded == result.image_tiles, "each model has its own feature cache"
    name = next(iter(trained))
    mx.save_safetensors(str(folder / "projector.safetensors"), {name: trained[name][..., :-1]})
    with pytest.raises(AdapterError, match="does not fit the model's projector"):
        load(out, adapter_path=str(folder))


# ------------------------------------------------------------------ command line
def run_cli(*args, env=None, input=None, module="mlx_llama3v.generate", timeout=120):
    cmd = [sys.executable, "-m", module, *map(str, args)]
    env = dict(os.environ, **(env or {}))
    return subprocess.run(
        cmd, capture_output=True, text=True, input=input, env=env, timeout=timeout
    )


def test_command_line_end_to_end(tiny, tmp_path):
    _, out, model, processor = tiny.get("minicpm_v2_5")
    IMAGE_A.save(tmp_path / "a.png")
    IMAGE_B.save(tmp_path / "b.jpg", quality=95)
    args = [
        "--model",
        out,
        "--image",
        tmp_path / "a.png",
        "--image",
        tmp_path / "b.jpg",
        "--prompt",
        "Tell me a story.",
        "--max-tokens",
        N,
        "--verbose",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    expected = generate(
        model,
        processor,
        "Tell me a story.",
        images=[str(tmp_path / "a.png"), str(tmp_path / "b.jpg")],
        max_tokens=N,
    )
    assert proc.stdout == expected.text + "\n"
    assert (
        "Prompt:" in proc.stderr
        and "Generation: 12 tokens" in proc.stderr
        and "Peak memory" in proc.stderr
    )


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr.strip(), result.stdout


def assert_error(args, *fragments):
    code, err, _ = cli(*args)
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_input(tiny, tmp_path):
    _, out, _, _ = tiny.get("minicpm_v2_5")
    model = ["--model", out]
    assert_error([*model, "--image", tmp_path / "nope.png"], "nope.png: file not found")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    assert_error(
        [*model, "--image", tmp_path / "broken.png"], "broken.png", "not a recognised image"
    )
    assert_error(
        [*model, "--prompt", "the quick brown fox " * 1000],
        "the prompt is",
        "context of 2048 tokens",
    )
    assert_error(["--model", tmp_path / "missing-model"], "model folder not found", "missing-model")
    assert_error([*model, "--adapter-path", tmp_path / "no-adapter"], "adapter folder not found")
    write_misfit_adapter(tmp_path / "wide", out)
    assert_error([*model, "--adapter-path", tmp_path / "wide"], "does not fit the model")
    assert_error([*model, "--max-tokens", 0], "--max-tokens")
    assert_error([*model, "--kv-bits", 4, "--max-kv-size", 64], "--kv-bits")


def test_a_hub_model_without_network_fails_with_one_line(tmp_path):
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "MLX_LLAMA3V_CACHE": str(tmp_path / "c"),
    }
    proc = run_cli("--model", "mlx-llama3v-tests/no-such-model", "--prompt", "Hi", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("error: mlx-llama3v-tests/no-such-model: ") and "\n" not in err, err
    assert "Hugging Face Hub" in err


def test_a_nonexistent_model_is_named(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "MLX_LLAMA3V_CACHE": str(tmp_path / "c")}
    proc = run_cli("--model", "nonexistent", "--prompt", "Hi", env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: nonexistent: no such local folder") and proc.stderr.count("\n") == 1


def test_stdout_that_cannot_be_written_is_one_error(tiny):
    _, out, _, _ = tiny.get("minicpm_v2_5")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "mlx_llama3v.generate", "--model", str(out), "--prompt", "Hi", "-m", "4"],
            stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "error: cannot write the output to stdout: No space left on device\n"


def test_the_prompt_from_a_file_or_stdin(tiny, tmp_path):
    _, out, model, processor = tiny.get("minicpm_v2_5")
    question = "Tell me a story. " * 30  # longer than one would type as an argument
    expected = generate(model, processor, question, max_tokens=N).text + "\n"
    (tmp_path / "q.txt").write_text(question)
    proc = run_cli("--model", out, "--prompt-file", tmp_path / "q.txt", "-m", N)
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr
    proc = run_cli("--model", out, "--prompt-file", "-", "-m", N, input=question)
    assert proc.returncode == 0 and proc.stdout == expected, proc.stderr
    assert_error(["--model", out, "--prompt-file", tmp_path / "none.txt"], "none.txt: prompt file not found")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    assert_error(["--model", out, "--prompt-file", tmp_path / "bin.txt"], "bin.txt: the prompt file is not UTF-8")


# ------------------------------------------------------------------ package
def test_importing_the_package_stays_cheap():
    code = (
        "import sys, mlx_llama3v; "
        "heavy = [m for m in ('mlx.core', 'mlx_lm', 'transformers', 'torch') if m in sys.modules]; "
        "print(heavy)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_lazy_exports_stay_the_functions_once_their_modules_are_imported():
    import mlx_llama3v
    import mlx_llama3v.generation.generate  # noqa: F401
    from mlx_llama3v.loading import load as load_function

    module = sys.modules["mlx_llama3v.generation.generate"]
    assert mlx_llama3v.generate is module.generate is generate
    assert mlx_llama3v.stream_generate is module.stream_generate
    assert mlx_llama3v.load is load_function
    assert {"load", "generate", "stream_generate"} <= set(dir(mlx_llama3v))
    with pytest.raises(AttributeError):
        mlx_llama3v.no_such_name  # noqa: B018
