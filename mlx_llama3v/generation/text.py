"""Tokens to text: mlx-lm's tokenizer wrapper with the end tokens, and stop strings.

``text_tokenizer`` wraps the processor's tokenizer in mlx-lm's ``TokenizerWrapper``
with its streaming detokenizer (byte-level BPE for Llama 3) and, as end tokens, the
tokenizer's EOS, ``<|eot_id|>`` and ``<|end_of_text|>`` when the vocabulary has them,
and the ``eos_token_id`` of the model folder's config.json / generation_config.json.

``StopStrings`` stops on user strings in the decoded text with mlx-lm's
``TextStateMachine``: text that may be the start of a stop string is held back until
it is known not to be, and the stop string itself is never emitted.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Iterable, Optional, Sequence, Set, Tuple

from .._mlx_lm import TextStateMachine
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    TokenizerWrapper,
)

END_TOKENS = ("<|eot_id|>", "<|end_of_text|>")

# building a detokenizer maps the whole vocabulary: once per tokenizer
_wrappers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def text_tokenizer(tokenizer) -> TokenizerWrapper:
    """mlx-lm's wrapper of a Hugging Face tokenizer, with every end token of the model."""
    if isinstance(tokenizer, TokenizerWrapper):
        return tokenizer
    wrapper = _wrappers.get(tokenizer)
    if wrapper is None:
        wrapper = TokenizerWrapper(
            tokenizer, _detokenizer_class(tokenizer), eos_token_ids=end_token_ids(tokenizer)
        )
        _wrappers[tokenizer] = wrapper
    return wrapper


def end_token_ids(tokenizer) -> Set[int]:
    ids = set(_config_eos_ids(getattr(tokenizer, "name_or_path", None)))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for token in END_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tokenizer.convert_ids_to_tokens(tid) == token:
            ids.add(tid)
    return ids


def _config_eos_ids(folder: Optional[str]) -> Iterable[int]:
    """``eos_token_id`` (an int or a list) of the model folder's configs, if any."""
    if not folder:
        return []
    ids = []
    for name in ("config.json", "generation_config.json"):
        try:
            with open(Path(folder) / name, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


def _detokenizer_class(tokenizer):
    # mlx-lm picks by the decoder in tokenizer.json; a fast tokenizer exposes it directly
    from tokenizers import decoders

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and isinstance(backend.decoder, decoders.ByteLevel):
        return BPEStreamingDetokenizer
    return NaiveStreamingDetokenizer


class StopStrings:
    """Feed decoded text; get back what may be shown and whether a stop string completed."""

    def __init__(self, stop: Optional[Sequence[str]] = None):
        stop = [s for s in (stop or []) if s]
        self._state = None
        if stop:
            machine = TextStateMachine({"normal": [(s, None) for s in stop]})
            self._state = machine.make_state()
        self.stopped = False

    def feed(self, text: str) -> Tuple[str, bool]:
        if self._state is None or self.stopped:
            return ("" if self.stopped else text), self.stopped
        self._state, shown, state = TextStateMachine.step(self._state, text)
        self.stopped = state is None
        return shown, self.stopped

    def flush(self) -> str:
        """Held-back text, at the end of a generation no stop string ended."""
        if self._state is None or self.stopped:
            return ""
        self._state, held, _ = TextStateMachine.flush(self._state)
        return held
