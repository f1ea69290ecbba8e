"""Training data: read conversations with images, tokenize them, mask the loss.

Records come from ``readers`` (JSONL, JSON arrays, Hugging Face datasets; streamed) in
these formats:

- LLaVA: ``{"image": "a.jpg" | [...], "conversations": [{"from": "human", "value":
  "<image>\\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}``; roles
  human/user, gpt/assistant, system. Each ``<image>`` marker becomes the next image
  at that place; with no marker the images open the first human turn (LLaVA's rule).
- MiniCPM-V's: the same with ``role``/``content`` turns, and ``image`` a path or a
  ``{"<image_00>": path, ...}`` map whose markers place each image in the text.
- chat: ``{"messages": [{"role": "user", "content": [{"type": "image_url",
  "image_url": {"url": "a.jpg"}}, {"type": "text", "text": "What is this?"}]},
  {"role": "assistant", "content": "A cat."}], "images": [...]}`` with OpenAI-style
  content parts (``image_url``, or ``image`` with a path, or ``image`` taking the next
  of ``images``).

Relative image paths are read under ``image_root`` (default: the data file's folder);
images stored in a dataset arrive as ``ImageBytes``. With a feature cache the
``SampleEncoder`` takes each image's key and tile layout from the cache (``layout``) and
opens no image file.

The loss falls on assistant tokens only, found from the chat template itself: the
tokens of assistant turn i are those between the rendering of messages[:i] with the
generation prompt and the rendering of messages[:i+1] (so the end-of-turn token is
learnt too); no token ids are hard-coded. A sample longer than ``max_length`` is
shortened at a turn boundary, else its last answer is cut, never inside an image's
tokens; what was dropped is counted. Every sample's image-token count is checked
against the feature rows its tiles will give the projector.

Bad records (unreadable line, missing image, no assistant turn, too long, ...) are
reported as ``file:line: reason`` and skipped (``DataReport`` counts them), or raise
``DataError`` at the first one with ``strict``.
"""

from __future__ import annotations

import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..models.projector import tokens_per_tile
from ..processing import ImageError, PromptError, build_prompt, load_image
from ..errors import UserError, one_line
from ..processing import resolve_processor_config
from ..processing import ProcessedImage
from .readers import ImageBytes, Record, ReaderError, open_records

ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
IMAGE_MARKER = "<image>"


class DataError(UserError, ValueError):
    """A bad record under ``strict``: the message is one line, ``file:line: reason``."""


class BadSample(ValueError):
    """One record cannot be used; ``str(e)`` is the reason."""


@dataclass(slots=True)  # slots: a million samples are held at once
class Sample:
    """One tokenized conversation ready for batching.

    ``ids`` (int32) is the whole sequence; ``targets[t]`` is True where token t is
    an assistant token (learnt from position t - 1), kept as the ``spans`` of the
    answers, [start, end) pairs (a few ints instead of a byte per token). ``images``
    are the sources in placeholder order; ``tile_patches[k]`` the patch count of each
    tile of image k.
    """

    ids: np.ndarray
    spans: Tuple[Tuple[int, int], ...]
    images: List[Any]
    tile_patches: List[List[int]]
    where: str
    index: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> np.ndarray:
        out = np.zeros(len(self.ids), dtype=bool)
        for start, end in self.spans:
            out[start:end] = True
        return out

    @property
    def num_targets(self) -> int:
        return sum(end - start for start, end in self.spans)


@dataclass
class DataReport:
    """What reading a data file kept, shortened and skipped."""

    kept: int = 0
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    shortened: int = 0
    tokens_dropped: int = 0
    images_dropped: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def merge(self, other: "DataReport") -> "DataReport":
        out = DataReport(
            self.kept + other.kept,
            max(self.records, other.records),
            self.skipped + other.skipped,
            self.shortened + other.shortened,
            self.tokens_dropped + other.tokens_dropped,
            self.images_dropped + other.images_dropped,
        )
        return out

    def summary(self, name: str) -> str:
        text = f"{name}: {self.kept} samples"
        if self.num_skipped:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
            text += f", {self.num_skipped} skipped ({kinds})"
        if self.shortened:
            text += (
                f", {self.shortened} shortened ({self.tokens_dropped} tokens, "
                f"{self.images_dropped} images dropped)"
            )
        return text


# ------------------------------------------------------------------ reading
def read_records(path) -> Iterator[Record]:
    """Records of a JSONL or JSON array file, a parquet file or a saved / hub dataset,
    with their positions (streamed: see ``readers``).

    A line that is not valid JSON is yielded with ``error`` set. In a JSON array the
    rest of the file after a syntax error cannot be read; that is one bad record.
    """
    return open_records(path)


# ------------------------------------------------------------------ normalising
def to_messages(record: Any, image_root: Path) -> List[Dict[str, Any]]:
    """A record of either format as ``build_prompt`` messages with inline image parts."""
    if not isinstance(record, Mapping):
        raise BadSample("a record must be a JSON object")
    if "messages" in record:
        return _chat_messages(record, image_root)
    if "conversations" in record:
        return _llava_messages(record, image_root)
    raise BadSample("no 'messages' (chat format) or 'conversations' (LLaVA format)")


def _llava_messages(record: Mapping, root: Path) -> List[Dict[str, Any]]:
    """LLaVA records, and MiniCPM-V's: ``image`` may map markers to paths
    (``{"<image_00>": "a.jpg", ...}``), each marker in the text taking its own image."""
    images = record.get("image", record.get("images"))
    named: Dict[str, Any] = {}
    if isinstance(images, Mapping):
        named = {str(k): _image_path(v, root) for k, v in images.items()}
        pending = []
    else:
        images = [] if images is None else list(images) if isinstance(images, list) else [images]
        pending = [_image_path(src, root) for src in images]
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise BadSample("'conversations' must be a list")
    markers = _marker_pattern(named)
    unused = dict(named)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise BadSample(f"conversation turn {i} is not an object")
        role = ROLE_ALIASES.get(str(turn.get("from", turn.get("role"))).lower())
        if role is None:
            raise BadSample(f"turn {i}: unknown speaker {turn.get('from', turn.get('role'))!r}")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise BadSample(f"turn {i}: 'value' must be a string")
        parts = _split_markers(value, pending, markers, named, unused) if role == "user" else value
        messages.append({"role": role, "content": parts})
    pending += list(unused.values())
    if pending:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise BadSample("the record has images but no human turn to put them in")
        images_first = [{"type": "image", "image": p} for p in pending]
        first_user["content"] = images_first + first_user["content"]
    return messages


def _marker_pattern(named: Mapping[str, Any]):
    names = sorted(named, key=len, reverse=True) + [IMAGE_MARKER]
    return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")


def _split_markers(value: str, pending: List[Any], markers, named, unused) -> List[Dict[str, Any]]:
    """Text with image markers -> parts: ``<image>`` takes the next pending image (or the
    next named one), a named marker (``<image_00>``) its own image."""
    pieces = markers.split(value)
    texts, found = pieces[0::2], pieces[1::2]
    parts = []
    for k, piece in enumerate(texts):
        if k:
            marker = found[k - 1]
            if marker in named:
                image = named[marker]
                unused.pop(marker, None)
            elif pending:
                image = pending.pop(0)
            elif unused:
                image = unused.pop(next(iter(unused)))
            else:
                raise BadSample(f"more {IMAGE_MARKER} markers than images")
            parts.append({"type": "image", "image": image})
        piece = piece.strip("\n") if k or len(texts) > 1 else piece
        if piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def _chat_messages(record: Mapping, root: Path) -> List[Dict[str, Any]]:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BadSample("'messages' must be a list")
    extra = [_image_path(src, root) for src in (record.get("images") or [])]
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadSample(f"message {i} is not an object")
        role = ROLE_ALIASES.get(str(message.get("role")).lower())
        if role is None:
            raise BadSample(f"message {i}: unknown role {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):
            content = [_chat_part(part, root, extra, i) for part in content]
        elif not isinstance(content, str):
            raise BadSample(f"message {i}: content must be a string or a list of parts")
        out.append({"role": role, "content": content})
    if extra:
        raise BadSample(f"{len(extra)} entries of 'images' are not used by any image part")
    return out


def _chat_part(part: Any, root: Path, extra: List[str], i: int) -> Dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind in ("text", "input_text"):
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, Mapping) else url
        return {"type": "image", "image": _image_path(url, root)}
    if kind in ("image", "input_image"):
        src = part.get("image", part.get("path"))
        if src is None:
            if not extra:
                raise BadSample(f"message {i}: an image part with no image and no 'images' left")
            return {"type": "image", "image": extra.pop(0)}
        return {"type": "image", "image": _image_path(src, root)}
    raise BadSample(f"message {i}: unknown content part type {kind!r}")


def _image_path(src: Any, root: Path) -> Any:
    """A local path (relative ones under ``root``), or image bytes / a PIL image from a dataset."""
    if isinstance(src, ImageBytes) or _is_pil(src):
        return src
    if isinstance(src, (bytes, bytearray)):
        return ImageBytes(bytes(src), f"<{len(src)} bytes>")
    if not isinstance(src, str) or not src:
        raise BadSample(f"image must be a path string, got {src!r}")
    if src.startswith(("http://", "https://", "data:")):
        raise BadSample(f"{src[:60]}: only local image files are supported")
    src = src[len("file://") :] if src.startswith("file://") else src
    path = Path(src).expanduser()
    return str(path if path.is_absolute() else root / path)


def _is_pil(src: Any) -> bool:
    return type(src).__module__.startswith("PIL.")


# ------------------------------------------------------------------ tokenizing
@dataclass
class SampleEncoder:
    """Turns messages into a ``Sample`` for one model: template, masks, checks.

    ``projector_config`` and the processor's patch size give the feature rows each
    tile will produce; ``features`` (optional) maps an image path to the patch
    counts of its cached tiles, which must agree with the prompt's. ``layout``
    (optional) maps an image source to (feature-cache key, its tile layout as a
    ``ProcessedImage``): the prompt is built from the cache and no image is opened.
    """

    tokenizer: Any
    processor_config: Mapping[str, Any]
    projector_config: Any
    max_length: int
    features: Optional[Callable[[str], Sequence[int]]] = None
    layout: Optional[Callable[[Any], Tuple[Any, ProcessedImage]]] = None

    def __post_init__(self):
        cfg = resolve_processor_config(self.processor_config)
        self.patch_size = cfg["patch_size"]
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(cfg["image_token"])

    def encode(self, messages: List[Dict[str, Any]], where: str) -> Tuple[Sample, Dict[str, int]]:
        """The sample and what shortening dropped (``tokens``, ``images``)."""
        messages = _load_images(messages, self.layout)
        full = self._render(messages, generation_prompt=False)
        spans = self._assistant_spans(messages, full.input_ids)
        if not spans:
            raise BadSample("no assistant turn (nothing to learn)")
        ids = full.input_ids
        patches = self._tile_patches(full)
        self._check_features(ids, patches, messages)
        sample = Sample(ids, tuple(spans), _image_sources(messages), patches, where)
        return self._fit(sample, spans, full)

    def _render(self, messages, generation_prompt: bool):
        return build_prompt(
            _unwrap(messages),
            self.tokenizer,
            self.processor_config,
            add_generation_prompt=generation_prompt,
        )

    def _assistant_spans(self, messages, ids: np.ndarray) -> List[Tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], generation_prompt=True).input_ids
            after = self._render(messages[: i + 1], generation_prompt=False).input_ids
            start, end = _common_prefix(before, ids), _common_prefix(after, ids)
            if end <= start:
                raise BadSample(f"assistant turn {i} renders to no tokens")
            spans.append((start, end))
        return spans

    def _tile_patches(self, inputs) -> List[List[int]]:
        p = self.patch_size
        counts = [(t.shape[0] // p) * (t.shape[1] // p) for t in inputs.tiles]
        out, k = [], 0
        for n in inputs.tiles_per_image:
            out.append(counts[k : k + n])
            k += n
        return out

    def _check_features(self, ids: np.ndarray, patches: List[List[int]], messages) -> None:
        """The image tokens must equal the rows the projector will give for the tiles."""
        if self.features is not None:
            for src, tiles in zip(_image_sources(messages), patches):
                cached = list(self.features(src))
                if cached != tiles:
                    raise BadSample(
                        f"{src}: the feature cache has tiles of {cached} patches, the image "
                        f"gives {tiles} (cache made with other image settings?)"
                    )
        rows = sum(tokens_per_tile(self.projector_config, n) for tiles in patches for n in tiles)
        slots = int((ids == self.image_token_id).sum())
        if rows != slots:
            raise BadSample(
                f"the prompt has {slots} image tokens but the tiles give {rows} feature rows"
            )

    def _fit(self, sample: Sample, spans, full) -> Tuple[Sample, Dict[str, int]]:
        """Shorten an over-long sample at a turn end, else cut its text tail."""
        T, limit = sample.length, self.max_length
        if T <= limit:
            return sample, {"tokens": 0, "images": 0}
        ends = [end for _, end in spans if end <= limit]
        cut = ends[-1] if ends else limit
        image_spans = self._image_spans(sample.ids, full)
        if any(s < cut < e for s, e in image_spans):
            raise BadSample(
                f"too long: {T} tokens > max length {limit}, and the cut would fall inside "
                "an image"
            )
        kept_spans = tuple((a, min(b, cut)) for a, b in sample.spans if a < cut)
        if not kept_spans:
            first = spans[0][0]
            raise BadSample(
                f"too long: {T} tokens > max length {limit} (the first answer starts at "
                f"token {first})"
            )
        kept = sum(1 for _, e in image_spans if e <= cut)
        dropped_images = len(sample.images) - kept
        short = Sample(
            sample.ids[:cut].copy(),  # not a view that keeps the whole sequence
            kept_spans,
            sample.images[:kept],
            sample.tile_patches[:kept],
            sample.where,
        )
        return short, {"tokens": T - cut, "images": dropped_images}

    def _image_spans(self, ids: np.ndarray, full) -> List[Tuple[int, int]]:
        """[start, end) token range of each image: its tiles' tokens and markers around them."""
        special = set(full.special_ids.get(k) for k in _IMAGE_MARKERS) - {None}
        slot = ids == self.image_token_id
        runs_start = np.flatnonzero(np.diff(np.concatenate([[0], slot.astype(np.int8)])) == 1)
        runs_end = np.flatnonzero(np.diff(np.concatenate([slot.astype(np.int8), [0]])) == -1) + 1
        spans, k = [], 0
        for n in full.tiles_per_image:
            s, e = int(runs_start[k]), int(runs_end[k + n - 1])
            while s > 0 and ids[s - 1] in special:
                s -= 1
            while e < len(ids) and ids[e] in special:
                e += 1
            spans.append((s, e))
            k += n
        return spans


_IMAGE_MARKERS = ("image_start", "image_end", "slice_start", "slice_end")


def _load_images(messages, layout=None):
    """Messages with every image part's file decoded once (prefix renders reuse it), or,
    with ``layout``, its tile layout taken from the feature cache (no file opened)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                dict(p, image=_LoadedImage(p["image"], layout)) if p["type"] == "image" else p
                for p in content
            ]
        out.append({"role": m["role"], "content": content})
    return out


class _LoadedImage:
    """A decoded image (or its cached tile layout) that remembers its source.

    ``image`` is what ``build_prompt`` takes; ``source`` what the sample keeps for
    training: the path / bytes, or the feature-cache key.
    """

    def __init__(self, src, layout=None):
        if layout is not None:
            self.source, self.image = layout(src)
            return
        if isinstance(src, str) and not os.path.exists(src):
            raise BadSample(f"missing image {src}")
        try:
            self.image = load_image(src)
        except ImageError as e:
            raise BadSample(str(e)) from None
        self.source = src


def _image_sources(messages) -> List[str]:
    return [
        p["image"].source if isinstance(p["image"], _LoadedImage) else p["image"]
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] == "image"
    ]


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _unwrap(messages):
    """The messages as ``build_prompt`` takes them: decoded PIL images in image parts."""
    return [
        {
            "role": m["role"],
            "content": [
                dict(p, image=p["image"].image) if isinstance(p.get("image"), _LoadedImage) else p
                for p in m["content"]
            ]
            if isinstance(m["content"], list)
            else m["content"],
        }
        for m in messages
    ]


# ------------------------------------------------------------------ data sets
def load_samples(
    paths: Sequence,
    encoder: SampleEncoder,
    image_root: Optional[Path] = None,
    strict: bool = False,
    keep: Callable[[int], bool] = lambda i: True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    progress: bool = False,
) -> Tuple[List[Sample], DataReport]:
    """Every usable sample of the sources, in order, and the report.

    ``keep(i)`` picks which records (numbered over all sources) this process reads,
    for data-parallel ranks; the others are not opened beyond their JSON line.
    Records are streamed (``readers``): memory holds the samples kept, not the file.
    ``progress``: a bar per source with rate and ETA (bytes of a file, rows of a dataset).
    """
    report = DataReport()
    samples: List[Sample] = []
    index = 0
    for path in paths:
        root = Path(image_root) if image_root else _default_root(path)
        try:
            stream = read_records(path)
        except (ReaderError, OSError) as e:
            raise DataError(f"{path}: {one_line(e)}" if isinstance(e, OSError) else str(e)) from None
        bar = _bar(stream, path, progress)
        for record in stream:
            i, index = index, index + 1
            if bar is not None:
                bar.update(stream.done - bar.n)
            if not keep(i):
                continue
            try:
                sample, dropped = _encode_record(record, encoder, root)
            except BadSample as e:
                reason = str(e)
                if strict:
                    raise DataError(f"{record.where}: {reason}") from None
                report.skipped[_kind(reason)] += 1
                _write(log, bar, f"skipped {record.where}: {reason}")
                continue
            sample.index = i
            samples.append(sample)
            report.kept += 1
            if dropped["tokens"]:
                report.shortened += 1
                report.tokens_dropped += dropped["tokens"]
                report.images_dropped += dropped["images"]
        if bar is not None:
            bar.close()
    report.records = index
    return samples, report


def _default_root(path) -> Path:
    text = str(path)
    if text.startswith("hf:"):
        return Path.cwd()
    p = Path(text).expanduser()
    return p if p.is_dir() else p.parent


def _bar(stream, path, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=stream.total,
        unit=stream.unit,
        unit_scale=stream.unit == "B",
        desc=f"reading {Path(str(path)).name}",
        dynamic_ncols=True,
        file=sys.stderr,
    )


def _write(log, bar, text: str) -> None:
    if bar is None:
        log(text)
    else:
        bar.clear()
        log(text)
        bar.refresh()


def _encode_record(record: Record, encoder: SampleEncoder, root: Path):
    if record.error:
        raise BadSample(record.error)
    messages = to_messages(record.data, root)
    try:
        return encoder.encode(messages, record.where)
    except (PromptError, ImageError) as e:
        raise BadSample(one_line(e)) from None


def _kind(reason: str) -> str:
    for key, kind in (
        ("malformed JSON", "malformed"),
        ("missing image", "missing image"),
        ("no assistant", "no assistant turn"),
        ("too long", "too long"),
    ):
        if key in reason:
            return kind
    return "other"


def split_train_valid(
    samples: List[Sample], fraction: float, seed: int
) -> Tuple[List[Sample], List[Sample]]:
    """A seeded split by record number: about ``fraction`` of the records validate.

    Decided per record (not per list), so data-parallel ranks holding different
    records agree on it.
    """
    if fraction <= 0:
        return samples, []
    is_valid = lambda s: _unit_hash(seed, s.index) < fraction
    return [s for s in samples if not is_valid(s)], [s for s in samples if is_valid(s)]


def _unit_hash(seed: int, index: int) -> float:
    """A number in [0, 1) fixed by (seed, index) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return ((x ^ (x >> 31)) >> 11) / float(1 << 53)


