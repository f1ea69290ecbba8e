"""A tiny Llama-3-style tokenizer written to disk: for models built from scratch and tests.

The shapes demo (``examples/shapes``) builds its model on it, and the tests use it
to stay offline.

``make_llama3_tokenizer(directory)`` writes ``tokenizer.json`` and
``tokenizer_config.json`` that load with ``transformers.AutoTokenizer`` and
``PreTrainedTokenizerFast``. The tokenizer is a byte-level BPE (Llama 3's split regex,
``BASE_VOCAB`` entries) trained on a small built-in text, followed by 256 special
tokens laid out like Llama 3's (``<|begin_of_text|>`` at ``BASE_VOCAB``, ``<|eot_id|>``
at ``BASE_VOCAB + 9``, ``<|reserved_special_token_N|>`` elsewhere), some of which can be
renamed the way MiniCPM-Llama3-V 2.5 renames them (``<unk>``, ``<image>``, ...). The
post-processor prepends BOS like Llama 3's, and the config carries the real Llama 3 chat
template, which also writes BOS: the one-BOS rule of the prompt builder is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Union

BASE_VOCAB = 384
NUM_SPECIAL = 256

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Llama 3's named special tokens, by offset from the first special id (128000 there).
NAMED = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    9: "<|eot_id|>",
}

# Renames of reserved tokens, by offset. MiniCPM-Llama3-V 2.5 uses 2, 10, 11, 20, 21
# (ids 128002, 128010, ...); <text>/</text> (the article's design) are placed arbitrarily.
RENAMES: Dict[str, int] = {
    "<unk>": 2,
    "<image>": 10,
    "</image>": 11,
    "<slice>": 20,
    "</slice>": 21,
    "<text>": 30,
    "</text>": 31,
}
MINICPM_RENAMES = ("<unk>", "<image>", "</image>", "<slice>", "</slice>")

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_TEXT = """\
A chat between a curious user and an artificial intelligence assistant. The assistant
gives helpful, detailed, and polite answers to the user's questions.
What is in this image? The image shows a small red house next to a tall green tree.
Describe the picture in detail. There are two cats sitting on a wooden table, and a dog
is sleeping under the window. The sky is blue and the sun is shining brightly.
How many people are in the photo? I can see three people walking along the street.
What colour is the car? The car is yellow, parked in front of the old station.
Tell me a story about the mountains, the river and the forest. Once upon a time, there
was a little village where everyone loved reading books and drinking warm tea together.
Please answer the question: which animal is larger, the elephant or the mouse?
Hello! Hi there, how are you today? I am fine, thank you. Let us look at another image.
system user assistant question answer picture photo image text slice describe
The quick brown fox jumps over the lazy dog 0123456789 times, then rests in the shade.
"""

_cache: Dict[tuple, str] = {}


def special_token_names(renames: Mapping[str, int]) -> List[str]:
    """The 256 special tokens in id order, reserved ones renamed per ``renames``."""
    by_offset = {offset: name for name, offset in renames.items()}
    names, reserved = [], 0
    for offset in range(NUM_SPECIAL):
        if offset in NAMED:
            names.append(NAMED[offset])
            continue
        names.append(by_offset.get(offset, f"<|reserved_special_token_{reserved}|>"))
        reserved += 1
    return names


def special_id(name: str) -> int:
    """The id ``name`` gets in a tokenizer made here (named, renamed or reserved)."""
    for offset, named in NAMED.items():
        if named == name:
            return BASE_VOCAB + offset
    if name in RENAMES:
        return BASE_VOCAB + RENAMES[name]
    return BASE_VOCAB + special_token_names({}).index(name)


def _tokenizer_json(renames: Mapping[str, int]) -> str:
    key = tuple(sorted(renames.items()))
    if key not in _cache:
        _cache[key] = _build(renames)
    return _cache[key]


def _build(renames: Mapping[str, int]) -> str:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(keepends=True) * 4, trainer)
    if tok.get_vocab_size() != BASE_VOCAB:
        raise RuntimeError(f"tiny BPE has {tok.get_vocab_size()} entries, wanted {BASE_VOCAB}")
    names = special_token_names(renames)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    bos = NAMED[0]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, BASE_VOCAB)],
            ),
        ]
    )
    for offset, name in enumerate(names):
        assert tok.token_to_id(name) == BASE_VOCAB + offset, name
    return tok.to_str()


def make_llama3_tokenizer(
    directory: Union[str, Path],
    extra: Union[Iterable[str], Mapping[str, int], None] = tuple(RENAMES),
    eos_token: str = "<|end_of_text|>",
    chat_template: Optional[str] = LLAMA3_CHAT_TEMPLATE,
    config_overrides: Optional[Mapping] = None,
) -> Path:
    """Write a tiny Llama-3-style tokenizer into ``directory`` and return the path.

    ``extra`` names the reserved tokens to rename: names from ``RENAMES`` (default: all
    of them; ``()`` for a plain Llama 3 tokenizer), or a mapping name -> offset
    (an offset is the position among the 256 special tokens, as in ``RENAMES``).
    ``unk_token`` is set in the config when ``<unk>`` is among them (as MiniCPM does).
    ``config_overrides`` is merged into ``tokenizer_config.json`` (a key with value
    None is removed).
    """
    if extra is None:
        extra = ()
    renames = dict(extra) if isinstance(extra, Mapping) else {n: RENAMES[n] for n in extra}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_tokenizer_json(renames), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": NAMED[0],
        "eos_token": eos_token,
        "model_max_length": 8192,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    if "<unk>" in renames:
        config["unk_token"] = "<unk>"
    for key, value in (config_overrides or {}).items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return directory


def load_tokenizer(directory: Union[str, Path]):
    """Load a tokenizer written by ``make_llama3_tokenizer`` (no remote code)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(directory))
