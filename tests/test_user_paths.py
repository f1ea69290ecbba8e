"""Paths a user takes through the merged commands, found by trying them as the README says."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mlx_llama3v.embed.sources import list_images


def _images(folder: Path, n: int):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (8 + i, 8), (i * 40, 0, 0)).save(path)
        paths.append(path)
    return paths


def test_embed_lists_the_images_of_chat_format_records(tmp_path):
    # the README's training formats include chat JSONL; embed must find its images
    # (it listed none, so training from that cache skipped every sample)
    imgs = _images(tmp_path / "img", 3)
    data = tmp_path / "chat.jsonl"
    records = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "img/0.png"}},
                        {"type": "text", "text": "What is it?"},
                    ],
                },
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": [{"type": "image", "image": str(imgs[2])}]},
                {"role": "assistant", "content": "Another."},
            ]
        },
        {
            "images": ["img/1.png"],
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": "Hello."},
            ],
        },
        {
            "messages": [
                {"role": "user", "content": "text only"},
                {"role": "assistant", "content": "ok"},
            ]
        },
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert list_images(data) == [imgs[0], imgs[2], imgs[1]]
    array = tmp_path / "chat.json"
    array.write_text(json.dumps(records))
    assert list_images(array) == [imgs[0], imgs[2], imgs[1]]


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["mlx_llama3v.generate", "--tmep", "1"], "No such option: --tmep"),
        (["mlx_llama3v.generate", "--max-tokens", "abc"], "'--max-tokens'"),
        (["mlx_llama3v.train", "--stage", "bogus"], "'bogus' is not one of"),
        (["mlx_llama3v.convert", "--dtype"], "--dtype"),
        (["mlx_llama3v", "embed", "--batch-size", "x"], "'--batch-size'"),
    ],
)
def test_a_bad_command_line_is_one_error_line(args, fragment):
    # typer's usage errors came as a framed, wrapped box of six lines
    proc = _run(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert fragment in lines[0] and "--help" in lines[0], lines[0]


def test_help_through_the_entry_point_names_the_command_as_typed():
    proc = _run("mlx_llama3v", "fuse", "--help")
    assert proc.returncode == 0 and "Usage: mlx_llama3v fuse [OPTIONS]" in proc.stdout, proc.stdout
    proc = _run("mlx_llama3v", "fuse", "--nope")
    assert proc.returncode == 2 and "see mlx_llama3v fuse --help" in proc.stderr, proc.stderr


def test_generate_refuses_both_prompt_and_prompt_file(tmp_path):
    # the file won and --prompt was dropped without a word
    question = tmp_path / "q.txt"
    question.write_text("What colour?")
    proc = _run(
        "mlx_llama3v.generate", "--model", str(tmp_path / "none"), "--prompt", "Hi",
        "--prompt-file", str(question),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: give --prompt or --prompt-file, not both"


def test_lora_keys_that_match_nothing_are_one_error(tiny_setup, tmp_path):
    # training started with nothing trainable and died in mx.value_and_grad with a traceback
    out = tmp_path / "run"
    proc = _run(
        "mlx_llama3v.train", "--model", str(tiny_setup.model), "--data", str(tiny_setup.data),
        "--out", str(out), "--iters", "1", "--lora-keys", "self_attn.bogus_proj",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: nothing to train: --lora-keys"), proc.stderr
    assert "self_attn.bogus_proj" in lines[-1] and "self_attn.q_proj" in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_projector_that_does_not_fit_says_how(tmp_path):
    # the message read "... projector: layers.0.layer_norm1.bias, (and 35 more)": mlx's list
    # punctuation kept, and nothing said whether the names were missing or unexpected
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_llama3v.loading import _adapter_problem

    layer = nn.Linear(2, 2)
    extra = [("a.w", mx.zeros(1)), ("b.w", mx.zeros(1)), ("c.w", mx.zeros(1))]
    with pytest.raises(ValueError) as e:
        layer.load_weights(extra + list(layer.parameters().items()))
    assert _adapter_problem(e.value) == "3 parameters not in the model: a.w (and 2 more)"
    with pytest.raises(ValueError) as e:
        layer.load_weights([("weight", mx.zeros((2, 2)))])
    assert _adapter_problem(e.value) == "1 parameters missing: bias"


def test_embed_of_a_source_without_images_is_an_error(tmp_path):
    # it made an empty cache and exited 0, and training then skipped every sample
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "Hi"}]}) + "\n")
    (tmp_path / "empty").mkdir()
    for source in (data, tmp_path / "empty"):
        out = tmp_path / "features"
        proc = _run(
            "mlx_llama3v.embed", "--model", str(tmp_path / "none"), "--images", str(source),
            "--out", str(out),
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"error: {source}: no images in it (nothing to embed)"
        assert not out.exists()


def test_a_loaded_model_answers_from_another_thread(tmp_path):
    # the server's engine thread failed every request of a Llama 3.1 (rope-scaled) model with
    # "There is no Stream(cpu, 0) in current thread": RoPE's frequencies were left lazy at load
    import threading

    from hf_checkpoints import make_composed

    from mlx_llama3v import generate, load
    from mlx_llama3v.convert import convert

    parts = make_composed(tmp_path / "hf")  # Llama 3.1 rope scaling
    folder = convert(
        vision=str(parts.extra["vision"]), llm=str(parts.extra["llm"]), mlx_path=tmp_path / "mlx",
        dtype="float32",
    )  # fmt: skip
    model, processor = load(folder)
    image = _images(tmp_path / "img", 1)[0]
    expected = generate(model, processor, "hi", images=[str(image)], max_tokens=3).text
    model, processor = load(folder)  # fresh: nothing evaluated yet by the main thread
    result, errors = [], []

    def answer():
        try:
            result.append(generate(model, processor, "hi", images=[str(image)], max_tokens=3).text)
        except Exception as e:  # reported below with the test's assertion
            errors.append(e)

    thread = threading.Thread(target=answer)
    thread.start()
    thread.join(60)
    assert not errors and result == [expected], errors
