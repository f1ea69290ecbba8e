"""Multi-turn conversations about images: ``ChatSession`` and the ``mlx_llama3v.chat`` loop.

Python::

    from mlx_llama3v import load
    from mlx_llama3v.chat import ChatSession

    model, processor = load("llama3v-mlx")
    chat = ChatSession(model, processor)
    print(chat.ask("What is in this image?", images=["cat.png"]).text)
    print(chat.ask("What colour is it?").text)  # prefills only the new turn

The session keeps the conversation and one ``PromptCache``: each turn renders the whole
conversation, and the KV cache already holds everything up to the new question, so only
the new turn's tokens are prefilled; the image-feature cache keeps earlier images from
being encoded again.

Command line: ``mlx_llama3v.chat --model PATH_OR_REPO [--image cat.png]``, then type
questions. ``/image PATH`` attaches an image to the next question, ``/clear`` starts a
new conversation, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence

import typer

from ..cli import command, new_app, one_line, run_app
from ..processing import ImageError, PromptError, load_image
from . import cli
from .generate import (
    DEFAULT_MODEL,
    GenerationResponse,
    GenerationResult,
    PromptCache,
    collect,
    format_stats,
    stream_generate,
)
from .sampling import SAMPLING_HELP, GenerationOptions, with_generation_options

HELP = "Commands: /image PATH (attach to the next question), /clear (new conversation), /exit."


class ChatSession:
    """A conversation with a model; ``generation`` keyword arguments apply to every turn.

    ``max_kv_size`` sets the session's KV cache (a rotating one); the other
    ``GenerationOptions`` (sampling, ``max_tokens``, ``stop``, ``kv_bits``...) can be given
    here as defaults (one by one, or as ``options``) or per turn. They are validated here.
    """

    def __init__(
        self,
        model,
        processor,
        system: Optional[str] = None,
        max_kv_size: Optional[int] = None,
        options: Optional[GenerationOptions] = None,
        **generation,
    ):
        self.model = model
        self.processor = processor
        self.system = system
        base = options if options is not None else GenerationOptions()
        if max_kv_size is not None:
            generation["max_kv_size"] = max_kv_size
        self.options = base.replace(**generation)
        self.cache = PromptCache(model, self.options.max_kv_size)
        self.messages: List[Dict[str, Any]] = []
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the image-feature cache stays)."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.cache.reset()

    def stream(
        self, question: str, images: Sequence[Any] = (), **generation
    ) -> Iterator[GenerationResponse]:
        """Ask ``question`` (about ``images``, if any); the answer joins the conversation."""
        parts = [{"type": "image", "image": image} for image in images]
        user = {"role": "user", "content": parts + [{"type": "text", "text": question}]}
        messages = self.messages + [user]
        answer: List[str] = []
        started = False
        try:
            for response in stream_generate(
                self.model,
                self.processor,
                messages,
                prompt_cache=self.cache,
                options=self.options.replace(max_kv_size=None),  # the cache is made
                **generation,
            ):
                started = True
                answer.append(response.text)
                yield response
        finally:
            if started:  # an interrupted answer stays, as far as it got
                self.messages = messages + [{"role": "assistant", "content": "".join(answer)}]

    def ask(self, question: str, images: Sequence[Any] = (), **generation) -> GenerationResult:
        """``stream``, collected (as ``generate`` returns it)."""
        return collect(self.stream(question, images, **generation))

    def __repr__(self) -> str:
        return f"ChatSession({len(self.messages)} messages, {self.cache.offset} cached tokens)"


# ------------------------------------------------------------------ command line
app = new_app()


@command(app, help="Chat about images with a Llama 3-V style model. " + HELP + " " + SAMPLING_HELP)
@with_generation_options
def run(
    model: cli.Model = DEFAULT_MODEL,
    image: cli.Images = None,
    system: cli.System = None,
    adapter_path: cli.AdapterPath = None,
    verbose: cli.Verbose = False,
    options: GenerationOptions = None,
) -> None:
    cli.check_images(image)
    loaded, processor = cli.load_model(model, adapter_path)
    session = ChatSession(loaded, processor, system=system, options=options)
    chat_loop(session, [str(p) for p in image or []], verbose)


def chat_loop(session: ChatSession, images: List[str], verbose: bool = False) -> None:
    """Read questions and commands until ``/exit`` or the end of input.

    Answers go to stdout; notes and errors (one line each; the loop goes on) to stderr.
    """
    interactive = sys.stdin.isatty()
    if interactive:
        note(HELP)
    pending = list(images)
    while True:
        try:
            line = input(">> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            break
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/clear":
            session.clear()
            pending = []
            note("new conversation")
        elif command == "/image":
            pending += attach(argument.strip().strip("'\""))
        elif command.startswith("/"):
            error(f"unknown command {command}. {HELP}")
        elif answer(session, line, pending, verbose):
            pending = []


def attach(path: str) -> List[str]:
    if not path:
        error("usage: /image PATH")
        return []
    try:
        load_image(path)
    except ImageError as e:
        error(e)
        return []
    note(f"{path} goes with the next question")
    return [path]


def answer(session: ChatSession, question: str, images: List[str], verbose: bool) -> bool:
    """Stream the answer to stdout; False when the question could not be asked."""
    last = None
    try:
        for last in session.stream(question, images):
            print(last.text, end="", flush=True)
    except (ImageError, PromptError) as e:
        error(e)
        return False
    except KeyboardInterrupt:  # stop this answer, keep the conversation
        pass
    print(flush=True)
    if verbose and last is not None:
        note(format_stats(last))
    return True


def note(message) -> None:
    typer.echo(str(message), err=True)


def error(message) -> None:
    typer.echo(f"error: {one_line(message)}", err=True)


def main() -> None:
    run_app(app, "mlx_llama3v.chat")


if __name__ == "__main__":
    main()
