"""Token ids for a conversation with images, in each family's layout.

Messages are ``{"role": "system" | "user" | "assistant", "content": str | parts}``
where parts are ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` (the
image taken from ``images`` in order) or ``{"type": "image", "image": src}``. Images
belong in user messages; if no message has an image part, the ``images`` go to the
start of the first user message (MiniCPM-Llama3-V 2.5's ``chat()`` does this).

Layouts (the tokens are the processor_config's; defaults shown):

- minicpm_v2_5: each image becomes ``<image>`` + ``<unk>`` x 96 + ``</image>`` for the
  source tile, then, when split, ``<slice>`` + rows joined by "\\n" (each row ``cols``
  such blocks) + ``</slice>``; the parts of a message are joined by "\\n" (so one image
  and a question give ``placeholder + "\\n" + question``). The conversation goes through
  the tokenizer's own chat template (Llama 3's), with the generation prompt.
- siglip_llama3: the same image blocks (729 tokens per tile), each text part wrapped in
  ``<text>`` ... ``</text>``, parts concatenated; Llama 3 chat template.
- bunny: Bunny's own template (LLaVA "SeparatorStyle.TWO" with sep " " and sep2
  ``<|end_of_text|>``), not Llama 3's:
  ``{system} USER: {user} ASSISTANT: {answer}<|end_of_text|>USER: {user} ASSISTANT:``,
  where an image part is ``image_token`` x 729 and parts are joined by "\\n"
  (``<image>\\n{question}``). A system message replaces the default system sentence.

The ids start with exactly one BOS whatever the template and the tokenizer's
post-processor do. Special tokens are looked up by content and must tokenize as single
tokens; the placeholder count is checked against the tiles.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .images import MAX_IMAGE_PIXELS
from .preprocess import ProcessedImage, family_layout, preprocess_image, resolve_processor_config
from .slicing import Grid
from ..errors import UserError

BUNNY_TURN_END = "<|end_of_text|>"
ROLES = ("system", "user", "assistant")
_FROM_LIST = object()  # an image part that takes the next of ``images``


class PromptError(UserError, ValueError):
    """A conversation cannot be turned into model input with this tokenizer/config."""


@dataclass
class PromptInputs:
    """Model input for one conversation.

    ``tiles`` (float32 (H, W, 3) arrays) are in the order of the placeholder blocks in
    ``input_ids``: image by image, each image's source tile then its slices row by row.
    ``grids[i]`` and ``tiles_per_image[i]`` describe image i.
    """

    input_ids: np.ndarray
    tiles: List[np.ndarray]
    grids: List[Optional[Grid]]
    tiles_per_image: List[int]
    image_token_id: int
    tokens_per_tile: int
    prompt: str = ""
    special_ids: Dict[str, int] = field(default_factory=dict)


def build_prompt(
    messages: Sequence[Mapping[str, Any]],
    tokenizer,
    processor_config: Optional[Mapping[str, Any]] = None,
    images: Optional[Sequence[Any]] = None,
    add_generation_prompt: bool = True,
    max_pixels: Optional[int] = MAX_IMAGE_PIXELS,
) -> PromptInputs:
    """Render ``messages`` (with their images) in the family's layout and tokenize them.

    ``tokenizer``: a Hugging Face tokenizer (``encode``, ``convert_tokens_to_ids``,
    ``convert_ids_to_tokens``, ``apply_chat_template``, ``bos_token``).
    """
    cfg = resolve_processor_config(processor_config)
    turns, sources = _normalise_messages(messages, images)
    processed = [  # an already processed image (e.g. a cached tile layout) is used as it is
        src if isinstance(src, ProcessedImage) else preprocess_image(src, cfg, max_pixels=max_pixels)
        for src in sources
    ]
    special = _special_ids(tokenizer, cfg, processed)
    placeholders = [_placeholder(p, cfg) for p in processed]
    rendered = [(role, _render_content(role, parts, placeholders, cfg)) for role, parts in turns]
    if family_layout(cfg).conversation == "bunny":
        text = _bunny_conversation(rendered, cfg, add_generation_prompt)
    else:
        text = _chat_template(tokenizer, rendered, add_generation_prompt)
    ids = _one_bos(list(tokenizer.encode(text, add_special_tokens=True)), special["bos"])
    n_tiles = sum(len(p.tiles) for p in processed)
    _check_placeholders(ids, special["image"], cfg["tokens_per_tile"], n_tiles, cfg["image_token"])
    return PromptInputs(
        input_ids=np.asarray(ids, dtype=np.int32),
        tiles=[t for p in processed for t in p.tiles],
        grids=[p.grid for p in processed],
        tiles_per_image=[len(p.tiles) for p in processed],
        image_token_id=special["image"],
        tokens_per_tile=cfg["tokens_per_tile"],
        prompt=text,
        special_ids=special,
    )


# tokenizer -> {token: id}: the checks below cost ~0.2 ms a token (get_added_vocab
# rebuilds a dict), which dominated reading a training set of many short records.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def special_token_id(tokenizer, token: str) -> int:
    """The id of special token ``token``, checked to exist and to encode as itself alone."""
    try:
        known = _CHECKED.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: check every time
        known = {}
    if token not in known:
        known[token] = _check_special_token(tokenizer, token)
    return known[token]


def _check_special_token(tokenizer, token: str) -> int:
    tid = tokenizer.convert_tokens_to_ids(token)
    # a missing token maps to None, or to the unk id when the tokenizer has one
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
        raise PromptError(f"the tokenizer has no token {token!r}; add it as a special token")
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {token: tid}
    # an ordinary vocabulary entry would merge with neighbouring text when tokenized
    if token not in added or list(tokenizer.encode(token, add_special_tokens=False)) != [tid]:
        raise PromptError(
            f"{token!r} is not an added special token of the tokenizer (it must tokenize "
            "as itself alone wherever it appears)"
        )
    return tid


def _special_ids(tokenizer, cfg, processed: List[ProcessedImage]) -> Dict[str, int]:
    if not getattr(tokenizer, "bos_token", None):
        raise PromptError("the tokenizer has no bos_token")
    needed = {"bos": tokenizer.bos_token, "image": cfg["image_token"]}
    if processed:
        needed.update(image_start=cfg["image_start"], image_end=cfg["image_end"])
    if any(p.grid is not None for p in processed):
        needed.update(slice_start=cfg["slice_start"], slice_end=cfg["slice_end"])
    layout = family_layout(cfg)
    needed.update({key: cfg[key] for key in layout.extra_tokens})
    if layout.conversation == "bunny":
        needed["turn_end"] = BUNNY_TURN_END
    return {k: special_token_id(tokenizer, v) for k, v in needed.items() if v is not None}


def _normalise_messages(messages, images) -> Tuple[List[Tuple[str, list]], List[Any]]:
    """[(role, parts)] with parts ("text", str) / ("image", index), and the image sources."""
    images = list(images or [])
    turns, sources, pending = [], [], iter(images)
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise PromptError(f"message {i}: role must be one of {', '.join(ROLES)}, got {role!r}")
        parts = _parts(content, i)
        for kind, _ in parts:
            if kind == "image" and role != "user":
                raise PromptError(f"message {i}: images are only allowed in user messages")
        turns.append((role, parts))
    has_image_parts = any(kind == "image" for _, parts in turns for kind, _ in parts)
    if images and not has_image_parts:
        first_user = next((t for t in turns if t[0] == "user"), None)
        if first_user is None:
            raise PromptError("images were given but there is no user message to put them in")
        first_user[1][:0] = [("image", _FROM_LIST)] * len(images)
    for _, parts in turns:
        for j, (kind, value) in enumerate(parts):
            if kind != "image":
                continue
            if value is _FROM_LIST:
                value = next(pending, _FROM_LIST)
                if value is _FROM_LIST:
                    raise PromptError(
                        f"the messages have more image parts than the {len(images)} images given"
                    )
            parts[j] = ("image", len(sources))
            sources.append(value)
    if next(pending, _FROM_LIST) is not _FROM_LIST:
        raise PromptError(f"{len(images)} images were given, more than the image parts that take them")
    return turns, sources


def _parts(content, index: int) -> list:
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, (list, tuple)):
        raise PromptError(f"message {index}: content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            parts.append(("text", str(part.get("text", ""))))
        elif kind == "image":
            src = part.get("image")
            parts.append(("image", _FROM_LIST if src is None else src))
        else:
            raise PromptError(f"message {index}: unknown content part {part!r} (type text or image)")
    return parts


def _placeholder(image: ProcessedImage, cfg) -> str:
    """The placeholder text of one image: a block per tile, slices grouped by rows."""
    block = cfg["image_token"] * cfg["tokens_per_tile"]
    if cfg["image_start"] is not None:
        block = cfg["image_start"] + block + cfg["image_end"]
    if image.grid is None:
        return block
    cols, rows = image.grid
    grid = "\n".join(block * cols for _ in range(rows))
    return block + cfg["slice_start"] + grid + cfg["slice_end"]


def _render_content(role: str, parts, placeholders: List[str], cfg) -> str:
    # the article's layout wraps the user's text in <text>...</text>; answers stay plain
    if family_layout(cfg).wraps_user_text and role == "user":
        return "".join(
            placeholders[v] if kind == "image" else cfg["text_start"] + v + cfg["text_end"]
            for kind, v in parts
        )
    return "\n".join(placeholders[v] if kind == "image" else v for kind, v in parts)


def _chat_template(tokenizer, rendered, add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("the tokenizer has no chat_template (Llama 3's is expected)")
    conversation = [{"role": role, "content": content} for role, content in rendered]
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _bunny_conversation(rendered, cfg, add_generation_prompt: bool) -> str:
    system = cfg["system_prompt"] or ""
    if rendered and rendered[0][0] == "system":
        system, rendered = rendered[0][1], rendered[1:]
    out = system + " "
    for role, content in rendered:
        if role == "system":
            raise PromptError("bunny: a system message may only come first")
        if role == "user":
            out += "USER: " + content + " "
        else:
            out += "ASSISTANT: " + content + BUNNY_TURN_END
    if add_generation_prompt:
        out += "ASSISTANT:"
    return out


def _one_bos(ids: List[int], bos_id: int) -> List[int]:
    start = 0
    while start < len(ids) and ids[start] == bos_id:
        start += 1
    return [bos_id] + ids[start:]


def _check_placeholders(ids, image_id: int, per_tile: int, n_tiles: int, token: str) -> None:
    """Every tile must own one run of exactly ``per_tile`` image tokens."""
    is_image = np.asarray(ids) == image_id
    edges = np.diff(np.concatenate([[0], is_image.astype(np.int8), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    if len(runs) != n_tiles or np.any(runs != per_tile):
        raise PromptError(
            f"the prompt has {int(is_image.sum())} {token!r} tokens in {len(runs)} runs, expected "
            f"{n_tiles} tiles x {per_tile}; does a text part contain {token!r}?"
        )
