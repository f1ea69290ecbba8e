"""The batching engine: one thread owns the model and decodes every request together.

A request (``Job``) arrives with its prompt already built (token ids and image tiles,
by the request thread). The engine thread then

1. takes the KV cache of the longest known prefix (``PrefixCache``) and fetches the
   image features of the new tiles (``generation.features``: cached by content);
2. prefills the rest of the prompt but its last token into that per-request mlx-lm
   ``KVCache`` from the token embeddings with the image features spliced in, about
   ``prefill_step_size`` tokens (of one prompt or several) per turn of the loop, so
   running streams keep decoding while a long prompt is read;
3. hands the last token, the filled cache, the sampler and the logits processors to
   mlx-lm's ``BatchGenerator``, which merges the caches into one batch (left-padded)
   and decodes one token for every running request per step (continuous batching:
   requests join and leave between steps).

Tokens are turned into text per request with mlx-lm's streaming detokenizer and our
``StopStrings``; events go to the job's queue for the request thread to send. A
cancelled job (its client went away) is dropped from the batch at the next turn of
the loop. A finished conversation's cache goes back to the ``PrefixCache``.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE, BatchGenerator
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from ..generation.generate import _fit_context, _prompt_embeddings
from ..generation.features import tile_key
from ..generation.prompt_cache import token_keys
from ..generation.text import StopStrings, text_tokenizer
from ..processing import PromptInputs
from .prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_CACHE_BYTES
from .prefix_cache import PrefixCache, from_layers

DEFAULT_MAX_BATCH = 8


@dataclass
class Sampling:
    """A request's generation settings (validated by ``schema``)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)


@dataclass
class Event:
    """What the engine tells a request: ``kind`` "text", "done" or "error"."""

    kind: str
    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[Dict[str, Any]] = None


class Job:
    """One request on its way through the engine."""

    def __init__(self, inputs: PromptInputs, sampling: Sampling):
        self.inputs = inputs
        self.sampling = sampling
        self.events: "queue.Queue[Event]" = queue.Queue()
        self.cancelled = threading.Event()
        self.done = False  # its last event ("done" or "error") was read
        self.submitted = time.perf_counter()
        self.first_token_at: Optional[float] = None
        self.uid: Optional[int] = None
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.generated: List[int] = []
        self.keys: List[Any] = []
        self.detokenizer = None
        self.stops: Optional[StopStrings] = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.inputs.input_ids)

    def cancel(self) -> None:
        self.cancelled.set()

    def usage(self) -> Dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def stream(self, poll: float = 0.1, alive=None) -> Iterator[Event]:
        """The job's events until "done" or "error". ``alive()`` is asked about every
        ``poll`` seconds, whether events come or not; when it says False the job is
        cancelled and this ends."""
        asked = time.monotonic()
        while True:
            try:
                event = self.events.get(timeout=poll)
            except queue.Empty:
                event = None
            if alive is not None and (event is None or time.monotonic() - asked >= poll):
                asked = time.monotonic()
                if not alive():
                    self.cancel()
                    return
            if event is None:
                continue
            if event.kind != "text":
                self.done = True
            yield event
            if self.done:
                return


class Engine:
    """Runs ``Job``s on ``model`` in a background thread; ``submit`` is thread-safe."""

    def __init__(
        self,
        model,
        processor,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        prefix_cache_bytes: Optional[int] = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = text_tokenizer(processor.tokenizer)
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        if prefix_cache_bytes is None:
            prefix_cache_bytes = DEFAULT_PREFIX_CACHE_BYTES
        self.prefix_cache = PrefixCache(model, prefix_cache_bytes)
        self._inbox: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._waiting: List[Job] = []
        self._prefilling: List[list] = []  # [job, steps iterator]
        self._running: Dict[int, Job] = {}
        self._samplers: Dict[tuple, Any] = {}
        self._closed = False
        self._batch = BatchGenerator(
            model.language_model,
            stop_tokens=[[t] for t in sorted(self.tokenizer.eos_token_ids)],
            completion_batch_size=max_batch,
            prefill_batch_size=max_batch,
            prefill_step_size=prefill_step_size,
        )
        self._thread = threading.Thread(target=self._loop, name="mlx_llama3v-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- outside the thread
    def check_fits(self, inputs: PromptInputs, max_tokens: int) -> int:
        """``max_tokens`` capped to the context; ``ContextError`` if the prompt is too long."""
        return _fit_context(self.model, len(inputs.input_ids), max_tokens)

    def submit(self, job: Job) -> Job:
        if self._closed:
            raise RuntimeError("the engine is closed")
        self._inbox.put(job)
        return job

    def cancel(self, job: Job) -> None:
        job.cancel()
        self._inbox.put(None)  # wake the loop

    def stats(self) -> Dict[str, int]:
        return {
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting) + self._inbox.qsize(),
            "prefix_cache_entries": len(self.prefix_cache),
        }

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # ---------------------------------------------------------------- the engine thread
    def _loop(self) -> None:
        while not self._closed:
            idle = not (self._running or self._prefilling or self._waiting)
            self._receive(block=idle)
            self._drop_cancelled()
            try:
                with mx.stream(self._batch.stream):
                    self._admit()
                    self._prefill_step()
                if self._running:
                    self._decode_step()
            except Exception as e:  # a fault in the model: fail every request, keep serving
                self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        self._fail_all("the server is shutting down")

    def _receive(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop_cancelled(self) -> None:
        self._waiting = [j for j in self._waiting if not j.cancelled.is_set()]
        self._prefilling = [p for p in self._prefilling if not p[0].cancelled.is_set()]
        gone = [uid for uid, j in self._running.items() if j.cancelled.is_set()]
        if gone:
            self._batch.remove(gone)
            for uid in gone:
                del self._running[uid]

    def _admit(self) -> None:
        while self._waiting and len(self._running) + len(self._prefilling) < self.max_batch:
            job = self._waiting.pop(0)
            self._prefilling.append([job, self._prefill(job)])

    def _prefill_step(self) -> None:
        """Read prompts, oldest first, up to about ``prefill_step_size`` tokens in all; the
        prompts read whole join the batch together (one merge, one first step)."""
        budget = self.prefill_step_size
        while self._prefilling and budget > 0:
            job, steps = self._prefilling[0]
            try:
                budget -= max(1, next(steps))
                continue
            except StopIteration as done:
                self._prefilling.pop(0)
                cache, keys = done.value
            except Exception as e:
                self._prefilling.pop(0)
                job.events.put(Event("error", text=f"generation failed: {type(e).__name__}: {e}"))
                continue
            self._insert(job, cache, keys)

    def _prefill(self, job: Job):
        """Generator: fills a KV cache with all of the prompt but its last token, yielding
        the number of tokens read after each chunk; returns the cache and its keys."""
        inputs = job.inputs
        tile_keys = [tile_key(t) for t in inputs.tiles]
        keys = token_keys(
            inputs.input_ids, inputs.image_token_id, tile_keys, inputs.tokens_per_tile
        )
        cache = self.prefix_cache.take(keys)
        start = cache.reuse(keys)
        job.cached_tokens = start
        embeds, _ = _prompt_embeddings(self.model, inputs, tile_keys, start)
        ids = mx.array(inputs.input_ids[start:-1])[None]
        embeds = embeds[None, :-1]
        lm = self.model.language_model
        for i in range(0, ids.shape[1], self.prefill_step_size):
            j = i + self.prefill_step_size
            lm(ids[:, i:j], cache=cache.layers, input_embeddings=embeds[:, i:j])
            mx.eval([c.state for c in cache.layers])
            yield ids[:, i:j].shape[1]
        return cache, keys

    def _insert(self, job: Job, cache, keys) -> None:
        s = job.sampling
        if s.seed is not None and s.temperature > 0:
            sampler = seeded_sampler(s)
        else:
            # one object per setting: mlx-lm samples the rows that share a sampler in one
            # batched call, instead of one slice and one call per request
            key = (s.temperature, s.top_p, s.min_p, s.top_k)
            sampler = self._samplers.get(key)
            if sampler is None:
                sampler = make_sampler(s.temperature, s.top_p, s.min_p, top_k=s.top_k)
                self._samplers[key] = sampler
        processors = make_logits_processors(repetition_penalty=s.repetition_penalty)
        ids = job.inputs.input_ids
        (uid,) = self._batch.insert(
            [[int(ids[-1])]],
            max_tokens=[s.max_tokens],
            caches=[cache.layers],
            all_tokens=[np.asarray(ids[:-1]).tolist()],
            samplers=[sampler],
            logits_processors=[processors],
        )
        job.uid = uid
        job.keys = keys
        job.detokenizer = self.tokenizer.detokenizer
        job.stops = StopStrings(s.stop)
        self._running[uid] = job

    def _decode_step(self) -> None:
        _, responses = self._batch.next()
        for r in responses:
            job = self._running.get(r.uid)
            if job is None:
                continue
            if job.first_token_at is None:
                job.first_token_at = time.perf_counter()
            job.completion_tokens += 1
            job.generated.append(r.token)  # in the KV cache now, an end token too
            finish = r.finish_reason
            if finish != "stop":  # "stop" here is an end token: not part of the text
                job.detokenizer.add_token(r.token)
            if finish is not None:
                job.detokenizer.finalize()
            text, stopped = job.stops.feed(job.detokenizer.last_segment)
            if stopped:
                finish = "stop"
            elif finish is not None:
                text += job.stops.flush()
            if text:
                job.events.put(Event("text", text=text))
            if finish is None:
                continue
            if stopped and r.finish_reason is None:
                caches = self._batch.remove([r.uid], return_prompt_caches=True)
                layers = caches[r.uid][0]
            else:
                layers = r.prompt_cache
            del self._running[r.uid]
            self._keep_prefix(job, layers)
            job.events.put(Event("done", finish_reason=finish, usage=job.usage()))

    def _keep_prefix(self, job: Job, layers) -> None:
        if layers:
            # evaluated now: unevaluated, the slices would keep the whole batch's cache alive
            mx.eval([c.state for c in layers])
            self.prefix_cache.put(from_layers(self.model, layers, job.keys + job.generated))

    def _fail_all(self, message: str) -> None:
        jobs = self._waiting + [p[0] for p in self._prefilling] + list(self._running.values())
        if self._running:
            self._batch.remove(list(self._running))
        self._waiting, self._prefilling, self._running = [], [], {}
        for job in jobs:
            job.events.put(Event("error", text=message))


def seeded_sampler(s: Sampling):
    """mlx-lm's sampling chain (its top-p, min-p and top-k filters, then a categorical
    draw at the temperature) drawing from the request's own random key, not MLX's
    global one, so a seeded request gives the same tokens whatever runs beside it.
    (``make_sampler`` always draws from the global key.)"""
    filters = []
    if 0 < s.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, s.top_p))
    if s.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, s.min_p))
    if s.top_k > 0:
        filters.append(lambda x: apply_top_k(x, s.top_k))
    key = [mx.random.key(s.seed)]

    def sample(logprobs):
        key[0], draw = mx.random.split(key[0])
        for f in filters:
            logprobs = f(logprobs)
        return mx.random.categorical(logprobs * (1 / s.temperature), key=draw)

    return sample
