"""Multi-turn chat: ``ChatSession`` and the ``mlx_llama3v.chat`` loop driven through stdin."""

import re

import pytest
from typer.testing import CliRunner

from mlx_llama3v.chat import ChatSession, app
from mlx_llama3v.generation.features import feature_cache
from mlx_llama3v.processing import ImageError
from test_generate import IMAGE_A, IMAGE_B, Tiny, run_cli

N = 8


@pytest.fixture(scope="module")
def minicpm(tmp_path_factory):
    _, out, model, processor = Tiny(tmp_path_factory.mktemp("chat")).get("minicpm_v2_5")
    return out, model, processor


def test_clear_starts_a_new_conversation(minicpm):
    _, model, processor = minicpm
    chat = ChatSession(model, processor, system="Answer briefly.", max_tokens=N)
    first = chat.ask("What is in this image?", images=[IMAGE_A])
    chat.ask("Tell me a story.")
    assert [m["role"] for m in chat.messages] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]
    chat.clear()
    assert (
        chat.messages == [{"role": "system", "content": "Answer briefly."}]
        and chat.cache.offset == 0
    )
    again = chat.ask("What is in this image?", images=[IMAGE_A])
    assert again.tokens == first.tokens and again.cached_tokens == 0
    assert again.tiles_encoded == 0, "the image-feature cache outlives the conversation"


def test_a_failed_turn_leaves_the_conversation_as_it_was(minicpm, tmp_path):
    _, model, processor = minicpm
    chat = ChatSession(model, processor, max_tokens=N)
    chat.ask("Tell me a story.")
    before = list(chat.messages)
    with pytest.raises(ImageError, match="file not found"):
        chat.ask("And this one?", images=[tmp_path / "missing.png"])
    assert chat.messages == before


def test_an_interrupted_answer_stays_in_the_conversation(minicpm):
    _, model, processor = minicpm
    chat = ChatSession(model, processor, max_tokens=N)
    stream = chat.stream("Tell me a story.", images=[IMAGE_B])
    partial = [next(stream).text, next(stream).text]
    stream.close()
    assert chat.messages[-1] == {"role": "assistant", "content": "".join(partial)}
    follow_up = chat.ask("Describe the picture in detail.")
    assert follow_up.cached_tokens > 0 and follow_up.tiles_encoded == 0


def stats(stderr):
    """(cached prompt tokens, tiles encoded) of each answer, from the --verbose lines."""
    line = r"Prompt: \d+ tokens \((\d+) cached\), [\d.]+ tokens-per-sec(?:; images: \d+ tiles \((\d+) encoded)?"
    return [(int(m.group(1)), int(m.group(2) or 0)) for m in re.finditer(line, stderr)]


def test_chat_loop_through_stdin(minicpm, tmp_path):
    out, model, processor = minicpm
    image = tmp_path / "a.png"
    IMAGE_A.save(image)
    script = "\n".join(
        [
            f"/image {image}",
            "What is in this image?",
            "Describe the picture in detail.",
            f"/image {tmp_path / 'missing.png'}",
            "/nonsense",
            "/clear",
            "Tell me a story.",
            "/exit",
            "never asked",
        ]
    )
    proc = run_cli(
        "--model",
        out,
        "--max-tokens",
        N,
        "--verbose",
        module="mlx_llama3v.chat",
        input=script + "\n",
    )
    assert proc.returncode == 0, proc.stderr

    feature_cache(model).clear()
    chat = ChatSession(model, processor, max_tokens=N)
    answers = [
        chat.ask("What is in this image?", images=[str(image)]).text,
        chat.ask("Describe the picture in detail.").text,
    ]
    chat.clear()
    answers.append(chat.ask("Tell me a story.").text)
    assert proc.stdout == "".join(a + "\n" for a in answers)

    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert (
        len(errors) == 2 and "missing.png: file not found" in errors[0] and "/nonsense" in errors[1]
    )
    assert "Traceback" not in proc.stderr
    (cached1, encoded1), (cached2, encoded2), (cached3, encoded3) = stats(proc.stderr)
    assert cached1 == 0 and encoded1 > 0
    assert cached2 > 0 and encoded2 == 0, "the second turn re-ran the prompt or the images"
    assert cached3 == 0 and encoded3 == 0, "/clear must empty the KV cache"


def test_chat_with_a_missing_image_option_exits_with_one_line(minicpm, tmp_path):
    out, _, _ = minicpm
    result = CliRunner().invoke(
        app, ["--model", str(out), "--image", str(tmp_path / "nope.png")], input=""
    )
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "nope.png: file not found" in err, err
