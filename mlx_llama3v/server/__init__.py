"""``mlx_llama3v.server``: an OpenAI-compatible HTTP API and a chat page for one model.

``mlx_llama3v.server --model PATH_OR_REPO [--port 8080] [--api-key KEY]`` serves

- ``POST /v1/chat/completions``: OpenAI's chat completions, with images as
  ``image_url`` content parts (data: URLs, http(s) URLs, local paths when allowed),
  streamed as server-sent events or whole;
- ``GET /v1/models`` and ``GET /health``;
- the chat page at ``/`` (plain files in ``static/``, nothing from the network).

Rooms: ``app`` (the HTTP server and its routes), ``schema`` (OpenAI request parsing,
validation and response shapes), ``images`` (fetching ``image_url`` parts), ``engine``
(continuous batching on mlx-lm's ``BatchGenerator``), ``prefix_cache`` (KV caches of
recent conversations), ``cli`` (the command line).
"""

from .app import Server, serve

__all__ = ["Server", "serve", "main"]


def main() -> None:
    from .cli import main as run

    run()
