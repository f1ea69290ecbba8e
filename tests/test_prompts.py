"""Prompt token ids for each family, against layouts written out by hand."""

import numpy as np
import pytest
from PIL import Image

from mlx_llama3v.processing import (
    BUNNY_SYSTEM_PROMPT,
    PromptError,
    build_prompt,
    preprocess_image,
    special_token_id,
)
from tiny_tokenizer import load_tokenizer, make_llama3_tokenizer, special_id

MINICPM = {"family": "minicpm_v2_5"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(make_llama3_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain Llama 3 tokenizer (no renamed tokens), as Bunny ships."""
    return load_tokenizer(make_llama3_tokenizer(tmp_path_factory.mktemp("plain"), extra=()))


def _noise(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def enc(tok, text):
    return list(tok.encode(text, add_special_tokens=False))


def ids_of(tok, *names):
    return [special_id(n) for n in names]


def _user(*parts):
    content = []
    for p in parts:
        content.append({"type": "image"} if p is None else {"type": "text", "text": p})
    return {"role": "user", "content": content}


def _block(n=96, token="<unk>", start="<image>", end="</image>"):
    return start + token * n + end


def test_tiny_tokenizer_special_ids(tok):
    assert tok.bos_token_id == special_id("<|begin_of_text|>")
    for name in ("<unk>", "<image>", "</image>", "<slice>", "</slice>", "<|eot_id|>", "<text>"):
        assert tok.convert_tokens_to_ids(name) == special_id(name)
        assert enc(tok, name) == [special_id(name)]
    # the post-processor prepends BOS, as Llama 3's does
    assert list(tok.encode("hi"))[0] == tok.bos_token_id


def test_minicpm_split_image_exact_ids(tok):
    img = _noise(1344, 900)
    out = build_prompt([_user(None, "What is in this image?")], tok, MINICPM, images=[img])
    # 1344x900 is sliced 3 cols x 2 rows (checked in test_slicing)
    assert out.grids == [(3, 2)] and out.tiles_per_image == [7]

    bos, sh, eh, eot, im, im_end, unk, sl, sl_end = ids_of(
        tok,
        "<|begin_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<image>",
        "</image>",
        "<unk>",
        "<slice>",
        "</slice>",
    )
    block = [im] + [unk] * 96 + [im_end]
    row = block * 3
    expected = (
        [bos, sh]
        + enc(tok, "user")
        + [eh]
        + enc(tok, "\n\n")
        + block
        + [sl]
        + row
        + enc(tok, "\n")
        + row
        + [sl_end]
        + enc(tok, "\nWhat is in this image?")
        + [eot]
        + [sh]
        + enc(tok, "assistant")
        + [eh]
        + enc(tok, "\n\n")
    )
    assert out.input_ids.dtype == np.int32
    assert out.input_ids.tolist() == expected

    # the same, from the string the reference notes describe
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + _block()
        + "<slice>"
        + _block() * 3
        + "\n"
        + _block() * 3
        + "</slice>"
        + "\nWhat is in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.input_ids.tolist() == enc(tok, text)
    assert out.prompt == text

    # tiles in placeholder order: source first, then the slices row by row
    assert out.image_token_id == unk and out.tokens_per_tile == 96
    assert int((out.input_ids == unk).sum()) == 7 * 96
    ref = preprocess_image(img, MINICPM)
    assert len(out.tiles) == 7
    for a, b in zip(out.tiles, ref.tiles):
        assert np.array_equal(a, b)


def test_exactly_one_bos(tok, tmp_path):
    bos = tok.bos_token_id
    msgs = [_user("Hello")]
    out = build_prompt(msgs, tok, MINICPM)
    # template writes BOS and the post-processor adds one: the duplicate is dropped
    assert list(tok.encode(tok.apply_chat_template(msgs, tokenize=False)))[:2] == [bos, bos]
    assert out.input_ids[0] == bos and int((out.input_ids == bos).sum()) == 1
    # a template without BOS still gives exactly one
    no_bos_template = (
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    tok2 = load_tokenizer(make_llama3_tokenizer(tmp_path / "t2", chat_template=no_bos_template))
    out2 = build_prompt(msgs, tok2, MINICPM)
    assert out2.input_ids.tolist() == out.input_ids.tolist()


def test_minicpm_multi_turn_with_system(tok):
    img = _noise(300, 200)  # not split: one block
    msgs = [
        {"role": "system", "content": "Be brief."},
        _user(None, "What is this?"),
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": "  And the colour?  "},
    ]
    out = build_prompt(msgs, tok, MINICPM, images=[img])
    text = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + _block() + "\nWhat is this?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA picture.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the colour?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.input_ids.tolist() == enc(tok, text)
    assert out.grids == [None] and len(out.tiles) == 1
    assert out.tiles[0].shape[:2] == (364, 546)  # 300x200 upscaled: find_best_resize


def test_images_without_parts_go_to_first_user_message(tok):
    img = _noise(300, 200)
    a = build_prompt([{"role": "user", "content": "What is this?"}], tok, MINICPM, images=[img])
    b = build_prompt([_user(None, "What is this?")], tok, MINICPM, images=[img])
    assert a.input_ids.tolist() == b.input_ids.tolist()


def test_two_images_in_one_message(tok):
    big, small = _noise(1000, 500, 1), _noise(200, 300, 2)
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": big},
                {"type": "image", "image": small},
                {"type": "text", "text": "Compare them."},
            ],
        }
    ]
    out = build_prompt(msgs, tok, MINICPM)
    assert out.grids == [(2, 1), None] and out.tiles_per_image == [3, 1]
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + _block()
        + "<slice>"
        + _block() * 2
        + "</slice>"
        + "\n"
        + _block()
        + "\nCompare them.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.input_ids.tolist() == enc(tok, text)
    expected_tiles = preprocess_image(big, MINICPM).tiles + preprocess_image(small, MINICPM).tiles
    assert len(out.tiles) == 4
    for a, b in zip(out.tiles, expected_tiles):
        assert np.array_equal(a, b)


def test_images_in_two_turns_keep_order(tok):
    first, second = _noise(200, 300, 1), _noise(310, 210, 2)
    msgs = [_user(None, "One?"), {"role": "assistant", "content": "Yes."}, _user(None, "Two?")]
    out = build_prompt(msgs, tok, MINICPM, images=[first, second])
    assert out.tiles[0].shape != out.tiles[1].shape
    assert np.array_equal(out.tiles[1], preprocess_image(second, MINICPM).tiles[0])
    unk = special_id("<unk>")
    positions = np.flatnonzero(out.input_ids == unk)
    eot_positions = np.flatnonzero(out.input_ids == special_id("<|eot_id|>"))
    # first image inside the first user turn, second inside the third message
    assert positions[95] < eot_positions[0] and eot_positions[1] < positions[96] < eot_positions[2]


def test_siglip_llama3_layout(tok):
    img = _noise(500, 400)
    cfg = {"family": "siglip_llama3"}
    out = build_prompt([_user(None, "Describe it.")], tok, cfg, images=[img])
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + _block(729)
        + "<text>Describe it.</text><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.input_ids.tolist() == enc(tok, text)
    assert out.tokens_per_tile == 729 and out.tiles[0].shape == (384, 384, 3)

    tiled = build_prompt(
        [_user(None, "Describe it.")], tok, dict(cfg, slice=True), images=[_noise(1000, 500)]
    )
    assert tiled.grids == [(3, 1)] and len(tiled.tiles) == 4
    assert int((tiled.input_ids == special_id("<unk>")).sum()) == 4 * 729
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + _block(729)
        + "<slice>"
        + _block(729) * 3
        + "</slice>"
        + "<text>Describe it.</text><|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert tiled.input_ids.tolist() == enc(tok, text)


def test_siglip_llama3_wraps_only_user_text(tok):
    cfg = {"family": "siglip_llama3"}
    turns = [
        _user(None, "Describe it."),
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "Sure?"},
    ]
    out = build_prompt(turns, tok, cfg, images=[_noise(50, 40)])
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + _block(729)
        + "<text>Describe it.</text><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<text>Sure?</text><|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert out.input_ids.tolist() == enc(tok, text)


BUNNY = {"family": "bunny"}
IMG_TOKEN = "<|reserved_special_token_0|>"


def test_bunny_layout(plain):
    tok = plain
    img = _noise(300, 200)
    out = build_prompt([_user(None, "What is this?")], tok, BUNNY, images=[img])
    text = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. USER: "
        + IMG_TOKEN * 729
        + "\nWhat is this? ASSISTANT:"
    )
    assert out.input_ids.tolist() == [tok.bos_token_id] + enc(tok, text)
    assert out.image_token_id == special_id(IMG_TOKEN)
    assert out.tiles[0].shape == (384, 384, 3) and len(out.tiles) == 1
    # the Llama 3 chat headers are not used
    assert special_id("<|start_header_id|>") not in out.input_ids.tolist()


def test_bunny_multi_turn_and_system(plain):
    tok = plain
    msgs = [
        {"role": "system", "content": "You are terse."},
        _user(None, "What is this?"),
        {"role": "assistant", "content": "A cat."},
        _user("Which colour?"),
    ]
    out = build_prompt(msgs, tok, BUNNY, images=[_noise(50, 50)])
    text = (
        "You are terse. USER: " + IMG_TOKEN * 729 + "\nWhat is this? ASSISTANT: A cat."
        "<|end_of_text|>USER: Which colour? ASSISTANT:"
    )
    assert out.prompt == text
    assert out.input_ids.tolist() == [tok.bos_token_id] + enc(tok, text)
    default = build_prompt([_user("Hi")], tok, BUNNY)
    assert default.prompt == BUNNY_SYSTEM_PROMPT + " USER: Hi ASSISTANT:"


def test_missing_special_tokens(tmp_path, plain, tok):
    with pytest.raises(PromptError, match="<unk>"):
        build_prompt([_user(None, "q")], plain, MINICPM, images=[_noise(20, 20)])
    # with <unk> as unk_token a missing token maps to the unk id: still caught
    only_unk = load_tokenizer(make_llama3_tokenizer(tmp_path / "unk", extra=("<unk>",)))
    assert only_unk.convert_tokens_to_ids("<image>") == only_unk.unk_token_id
    with pytest.raises(PromptError, match="<image>"):
        build_prompt([_user(None, "q")], only_unk, MINICPM, images=[_noise(20, 20)])
    # <slice> is only needed when an image is split
    no_slice = load_tokenizer(
        make_llama3_tokenizer(tmp_path / "ns", extra=("<unk>", "<image>", "</image>"))
    )
    build_prompt([_user(None, "q")], no_slice, MINICPM, images=[_noise(20, 20)])
    with pytest.raises(PromptError, match="<slice>"):
        build_prompt([_user(None, "q")], no_slice, MINICPM, images=[_noise(1000, 500)])
    # siglip_llama3 needs <text>
    minicpm_only = load_tokenizer(
        make_llama3_tokenizer(tmp_path / "m", extra=("<unk>", "<image>", "</image>"))
    )
    with pytest.raises(PromptError, match="<text>"):
        build_prompt([_user("q")], minicpm_only, {"family": "siglip_llama3"})
    # bunny works with a plain Llama 3 tokenizer, not with one whose reserved_0 is renamed
    build_prompt([_user(None, "q")], plain, BUNNY, images=[_noise(20, 20)])
    with pytest.raises(PromptError, match="reserved_special_token_0"):
        build_prompt([_user(None, "q")], tok, BUNNY, images=[_noise(20, 20)])


def test_special_token_must_be_single_special(tok):
    assert special_token_id(tok, "<image>") == special_id("<image>")
    with pytest.raises(PromptError, match="no token"):
        special_token_id(tok, "<definitely-missing>")


def test_placeholder_count_is_verified(tok):
    # the placeholder typed in the user's text would add a stray image token
    with pytest.raises(PromptError, match="expected 1 tiles x 96"):
        build_prompt([_user(None, "what is <unk>?")], tok, MINICPM, images=[_noise(20, 20)])
    with pytest.raises(PromptError, match="expected 2 tiles x 729"):
        build_prompt(
            [_user(None, None, "x <unk>")],
            tok,
            {"family": "siglip_llama3"},
            images=[_noise(9, 9)] * 2,
        )


def test_placeholder_must_be_an_added_token(tok):
    # "a" is in the BPE vocabulary but would merge with neighbouring text ("Ġa")
    assert enc(tok, "a") == [tok.convert_tokens_to_ids("a")]
    with pytest.raises(PromptError, match="not an added special token"):
        build_prompt(
            [_user(None, "q")],
            tok,
            {"family": "bunny", "image_token": "a"},
            images=[_noise(20, 20)],
        )


def test_message_errors(tok):
    img = _noise(20, 20)
    with pytest.raises(PromptError, match="role"):
        build_prompt([{"role": "bot", "content": "x"}], tok, MINICPM)
    with pytest.raises(PromptError, match="only allowed in user"):
        build_prompt(
            [{"role": "assistant", "content": [{"type": "image"}]}], tok, MINICPM, images=[img]
        )
    with pytest.raises(PromptError, match="more image parts"):
        build_prompt([_user(None, None, "q")], tok, MINICPM, images=[img])
    with pytest.raises(PromptError, match="2 images were given"):
        build_prompt([_user(None, "q")], tok, MINICPM, images=[img, img])
    with pytest.raises(PromptError, match="unknown content part"):
        build_prompt([{"role": "user", "content": [{"type": "video"}]}], tok, MINICPM)
    with pytest.raises(PromptError, match="no user message"):
        build_prompt([{"role": "system", "content": "x"}], tok, MINICPM, images=[img])


def test_no_chat_template(tmp_path):
    t = load_tokenizer(make_llama3_tokenizer(tmp_path / "nt", chat_template=None))
    with pytest.raises(PromptError, match="chat_template"):
        build_prompt([_user("q")], t, MINICPM)


def test_bad_image_in_prompt_raises_image_error(tok):
    from mlx_llama3v.processing import ImageError

    with pytest.raises(ImageError):
        build_prompt([_user(None, "q")], tok, MINICPM, images=[b"not an image"])


def test_tokenizer_factory_is_fast_and_loadable(tmp_path):
    import time

    from transformers import AutoTokenizer

    start = time.perf_counter()
    path = make_llama3_tokenizer(tmp_path / "fast")
    assert time.perf_counter() - start < 1.0
    auto = AutoTokenizer.from_pretrained(str(path))
    assert auto.convert_tokens_to_ids("<slice>") == special_id("<slice>")
    assert auto.chat_template is not None and auto.eos_token == "<|end_of_text|>"
