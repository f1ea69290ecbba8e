"""Answer questions about images: the Python API and the ``mlx_llama3v.generate`` command.

Python::

    from mlx_llama3v import load, generate, stream_generate

    model, processor = load("llama3v-mlx")
    print(generate(model, processor, "What is in this image?", images=["cat.png"]).text)
    for response in stream_generate(model, processor, "Describe it.", images=["cat.png"]):
        print(response.text, end="", flush=True)

``prompt`` is a question (one user message, after ``system`` if given) or a whole
conversation (``processing.build_prompt``'s messages); ``images`` go with it. The
prompt's image tiles are encoded (or taken from the model's image-feature cache,
``generation.features``), spliced into the token embeddings, and mlx-lm's
``stream_generate`` decodes from those ``input_embeddings`` with its samplers
(``make_sampler``: temperature 0 is greedy), logits processors (repetition penalty),
KV cache (``kv_bits`` quantization, ``max_kv_size`` rotation), chunked prefill and
streaming detokenizer. Generation stops at the model's end tokens, at a ``stop``
string (not included in the text) or after ``max_tokens``.

Multi-turn: pass the same ``PromptCache`` (``prompt_cache=``) to successive calls and
only the tokens after the longest prefix already in the KV cache are prefilled;
``chat.ChatSession`` does this bookkeeping.

Command line: ``mlx_llama3v.generate --model PATH_OR_REPO --image cat.png --prompt "..."``
(or ``--prompt-file FILE``, ``-`` for standard input; ``--help`` lists the options). Text streams to stdout; ``--verbose`` adds statistics
on stderr. Bad input (a missing or unreadable image, a prompt longer than the context,
a missing model, an adapter that does not fit) prints one ``error: ...`` line on stderr
and exits with status 2.
"""

from __future__ import annotations

import time
from contextlib import closing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
import typer
from mlx_lm.generate import GenerationResponse as LMResponse
from mlx_lm.generate import stream_generate as lm_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from .. import cpu
from ..cli import command, new_app, run_app
from ..processing import PromptError
from . import cli
from .features import image_features, tile_key
from .prompt_cache import PromptCache, token_keys
from .sampling import SAMPLING_HELP, GenerationOptions, with_generation_options
from .text import StopStrings, text_tokenizer

# The released Llama 3-V weights. openbmb/MiniCPM-Llama3-V-2_5 holds the same weights
# (under other tensor names) and converts to the same model.
DEFAULT_MODEL = "mustafaaljadery/llama3v"
DEFAULT_PROMPT = "What is in this image?"

Prompt = Union[str, Sequence[Dict[str, Any]]]

__all__ = [
    "DEFAULT_MODEL",
    "ContextError",
    "GenerationOptions",
    "GenerationResponse",
    "GenerationResult",
    "PromptCache",
    "generate",
    "stream_generate",
]


class ContextError(PromptError):
    """The prompt does not fit in the model's context."""


@dataclass
class GenerationResponse(LMResponse):
    """One step of ``stream_generate``: mlx-lm's response, plus the image side.

    ``text`` is the new text (possibly empty while a stop string may be starting);
    ``prompt_tokens`` counts the tokens this call prefilled and ``cached_tokens`` those
    reused from the KV cache; ``image_tiles`` is the prompt's tile count, of which
    ``tiles_encoded`` went through the vision tower (the rest came from the feature
    cache) in ``vision_time`` seconds (not part of ``prompt_tps``).
    ``finish_reason``: None, "stop" (end token or stop string) or "length".
    """

    cached_tokens: int = 0
    image_tiles: int = 0
    tiles_encoded: int = 0
    vision_time: float = 0.0


@dataclass
class GenerationResult:
    """All of a generation: the text, the tokens (an end token included) and the stats."""

    text: str
    tokens: List[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0
    image_tiles: int = 0
    tiles_encoded: int = 0
    vision_time: float = 0.0

    def __str__(self) -> str:
        return self.text


def as_messages(prompt: Prompt, system: Optional[str] = None) -> List[Dict[str, Any]]:
    """A question becomes a user message (after the system message); messages pass as given."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = list(prompt)
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    return messages


def stream_generate(
    model,
    processor,
    prompt: Prompt,
    images: Optional[Sequence[Any]] = None,
    *,
    system: Optional[str] = None,
    sampler=None,
    logits_processors=None,
    prompt_cache: Optional[PromptCache] = None,
    options: Optional[GenerationOptions] = None,
    **kwargs,
) -> Iterator[GenerationResponse]:
    """Yield the answer to ``prompt`` (about ``images``) piece by piece.

    The keyword arguments are ``GenerationOptions`` (given one by one, or as ``options``;
    the keywords then change those): ``max_tokens`` (-1: up to the context length);
    ``temp`` (0: greedy), ``top_p``, ``top_k``, ``min_p`` and ``seed`` make mlx-lm's
    sampler, unless ``sampler`` is given; ``repetition_penalty`` adds mlx-lm's logits
    processor to ``logits_processors``; ``stop`` strings; ``max_kv_size`` (a rotating KV
    cache, when no ``prompt_cache`` is given), and ``kv_bits``, ``kv_group_size``,
    ``quantized_kv_start``, ``prefill_step_size`` for mlx-lm's ``generate_step``. A value
    that makes no sense raises ``sampling.OptionError`` (a ValueError) naming it.
    ``prompt_cache``: reuse (and update) a ``PromptCache`` across calls.

    Raises ``processing.ImageError`` / ``PromptError`` (``ContextError`` when the prompt
    does not fit the context) before any token is generated.
    """
    o = options.replace(**kwargs) if options is not None else GenerationOptions.from_kwargs(kwargs)
    if o.kv_bits is not None and _rotating(prompt_cache):
        raise ValueError(
            "kv_bits cannot be combined with max_kv_size (mlx-lm cannot quantize a rotating KV cache)"
        )
    inputs = processor(as_messages(prompt, system), images)
    max_tokens = _fit_context(model, len(inputs.input_ids), o.max_tokens)
    cache = prompt_cache if prompt_cache is not None else PromptCache(model, o.max_kv_size)

    tic = time.perf_counter()
    tile_keys = [tile_key(t) for t in inputs.tiles]
    keys = token_keys(inputs.input_ids, inputs.image_token_id, tile_keys, inputs.tokens_per_tile)
    start = cache.reuse(keys)
    embeds, encoded = _prompt_embeddings(model, inputs, tile_keys, start)
    extra = dict(
        cached_tokens=start,
        image_tiles=len(inputs.tiles),
        tiles_encoded=encoded,
        vision_time=time.perf_counter() - tic,
    )

    if o.seed is not None:
        mx.random.seed(o.seed)
    if sampler is None:
        sampler = make_sampler(o.temp, o.top_p, o.min_p, top_k=o.top_k)
    logits_processors = list(logits_processors or []) + make_logits_processors(
        repetition_penalty=o.repetition_penalty, repetition_context_size=o.repetition_context_size
    )
    steps = lm_stream_generate(
        model.language_model,
        text_tokenizer(processor.tokenizer),
        mx.array(inputs.input_ids[start:]),
        max_tokens=max_tokens,
        input_embeddings=embeds,
        prompt_cache=cache.layers,
        sampler=sampler,
        logits_processors=logits_processors,
        kv_bits=o.kv_bits,
        kv_group_size=o.kv_group_size,
        quantized_kv_start=o.quantized_kv_start,
        prefill_step_size=o.prefill_step_size,
    )
    generated: List[int] = []
    try:
        with closing(steps):
            yield from _with_stop_strings(steps, StopStrings(o.stop), generated, extra)
    finally:
        cache.record(keys + generated)


def generate(
    model,
    processor,
    prompt: Prompt,
    images: Optional[Sequence[Any]] = None,
    *,
    verbose: bool = False,
    **kwargs,
) -> GenerationResult:
    """The whole answer of ``stream_generate`` (same arguments) with its statistics.

    ``verbose`` prints the text as it comes and then the statistics.
    """
    return collect(stream_generate(model, processor, prompt, images, **kwargs), verbose)


def collect(responses: Iterable[GenerationResponse], verbose: bool = False) -> GenerationResult:
    """The text, tokens and final statistics of a stream of responses."""
    pieces: List[str] = []
    tokens: List[int] = []
    last = None
    for last in responses:
        if verbose:
            print(last.text, end="", flush=True)
        pieces.append(last.text)
        tokens.append(last.token)
    result = GenerationResult(text="".join(pieces), tokens=tokens)
    if last is not None:
        for f in fields(GenerationResult):
            if f.name not in ("text", "tokens"):
                setattr(result, f.name, getattr(last, f.name))
    if verbose:
        print()
        print(format_stats(result))
    return result


def format_stats(r) -> str:
    """Prompt and generation speed, image tiles and peak memory, on three lines."""
    images = ""
    if r.image_tiles:
        cached = r.image_tiles - r.tiles_encoded
        images = (
            f"; images: {r.image_tiles} tiles ({r.tiles_encoded} encoded, {cached} cached) "
            f"in {r.vision_time:.3f} s"
        )
    return (
        f"Prompt: {r.prompt_tokens} tokens ({r.cached_tokens} cached), "
        f"{r.prompt_tps:.3f} tokens-per-sec{images}\n"
        f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec\n"
        f"Peak memory: {r.peak_memory:.3f} GB"
    )


def _with_stop_strings(steps, stops: StopStrings, generated: List[int], extra: dict):
    """mlx-lm's responses as ours, cut at the first stop string."""
    for r in steps:
        generated.append(r.token)
        text, stopped = stops.feed(r.text)
        finish = "stop" if stopped else r.finish_reason
        if finish is not None and not stopped:
            text += stops.flush()
        base = {f.name: getattr(r, f.name) for f in fields(r)}
        yield GenerationResponse(**{**base, "text": text, "finish_reason": finish}, **extra)
        if stopped:
            return


def _prompt_embeddings(model, inputs, tile_keys: Sequence[str], start: int):
    """Embeddings of the tokens from ``start`` on, and how many tiles were encoded.

    Only the tiles whose placeholders lie in that part are looked up.
    """
    ids = inputs.input_ids
    per_tile = inputs.tokens_per_tile
    before = int(np.count_nonzero(ids[:start] == inputs.image_token_id))
    first = before // per_tile
    features, encoded = image_features(model, inputs.tiles[first:], tile_keys[first:])
    rows = None
    if features:
        rows = [mx.concatenate(features, axis=0)[before - first * per_tile :]]
    return model.get_input_embeddings(ids[start:], image_features=rows), encoded


def _fit_context(model, prompt_tokens: int, max_tokens: int) -> int:
    """``max_tokens`` capped to the room the context leaves; ContextError if there is none."""
    limit = model.config.text_config.max_position_embeddings
    if not limit:
        return max_tokens
    if prompt_tokens >= limit:
        raise ContextError(
            f"the prompt is {prompt_tokens} tokens, more than the model's context of "
            f"{limit} tokens leaves room for; use a shorter prompt or fewer images"
        )
    room = limit - prompt_tokens
    return room if max_tokens < 0 else min(max_tokens, room)


def _rotating(cache: Optional[PromptCache]) -> bool:
    return cache is not None and cache.max_kv_size is not None


# ------------------------------------------------------------------ command line
app = new_app()


@command(
    app,
    help="Answer a question about images with a Llama 3-V style model; the text streams to "
    "stdout. " + SAMPLING_HELP,
)
@with_generation_options
def run(
    model: cli.Model = DEFAULT_MODEL,
    image: cli.Images = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The question.")] = DEFAULT_PROMPT,
    prompt_file: Annotated[
        Optional[Path],
        typer.Option("--prompt-file", help="Read the question from this file ('-': standard input)."),
    ] = None,
    system: cli.System = None,
    adapter_path: cli.AdapterPath = None,
    verbose: cli.Verbose = False,
    options: GenerationOptions = None,
) -> None:
    question = cli.read_prompt(prompt, prompt_file)
    cli.check_images(image)
    loaded, processor = cli.load_model(model, adapter_path)
    images = [str(p) for p in image or []]
    last = None
    for last in stream_generate(loaded, processor, question, images, system=system, options=options):
        print(last.text, end="", flush=True)
    print(flush=True)
    if verbose and last is not None:
        typer.echo(format_stats(last), err=True)
        typer.echo(cpu.describe(), err=True)


def main() -> None:
    run_app(app, "mlx_llama3v.generate")


if __name__ == "__main__":
    main()
