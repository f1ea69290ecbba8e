"""The ``mlx_llama3v.server`` command (and ``python -m mlx_llama3v.server``).

Loads the model (as ``generate`` does: a converted folder or a Hugging Face checkpoint,
plus ``--adapter-path``) and serves it until interrupted. Bad options or a model that
cannot be loaded end with one ``error: ...`` line and exit status 2; so does a port
already in use.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer
from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE

from ..cli import command, new_app, run_app
from ..errors import UserError
from ..generation import cli
from .engine import DEFAULT_MAX_BATCH
from .prefix_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_CACHE_BYTES

API_KEY_ENV = "MLX_LLAMA3V_API_KEY"

app = new_app()


@command(
    app,
    help="Serve a Llama 3-V style model over an OpenAI-compatible HTTP API "
    "(POST /v1/chat/completions, GET /v1/models, GET /health) with a chat page at /.",
)
def run(
    model: cli.Model = "mustafaaljadery/llama3v",
    adapter_path: cli.AdapterPath = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", help="Port to listen on (0: any free port).")
    ] = 8080,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            help="Require 'Authorization: Bearer KEY' on /v1/ "
            f"(default: ${API_KEY_ENV}, else none).",
        ),
    ] = None,
    model_name: Annotated[
        Optional[str],
        typer.Option(
            "--model-name", help="The model id clients send (default: the --model value)."
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", help="Answer length when a request sets no max_tokens.")
    ] = 512,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Requests decoded together; more wait in line.")
    ] = DEFAULT_MAX_BATCH,
    allow_local_images: Annotated[
        bool,
        typer.Option(
            "--allow-local-images", help="Let image_url parts name files on this machine."
        ),
    ] = False,
    image_timeout: Annotated[
        float, typer.Option("--image-timeout", help="Seconds to fetch an http(s) image.")
    ] = 10.0,
    max_image_bytes: Annotated[
        int, typer.Option("--max-image-bytes", help="Largest image file accepted.")
    ] = 20 * 2**20,
    max_image_pixels: Annotated[
        int, typer.Option("--max-image-pixels", help="Largest image (width x height) accepted.")
    ] = 8192 * 8192,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", help="Largest request body accepted (413 above).")
    ] = 64 * 2**20,
    prompt_cache_bytes: Annotated[
        int,
        typer.Option(
            "--prompt-cache-bytes", help="KV caches of recent conversations kept, in bytes."
        ),
    ] = DEFAULT_PREFIX_CACHE_BYTES,
    feature_cache_bytes: Annotated[
        Optional[int],
        typer.Option("--feature-cache-bytes", help="Image features kept by content, in bytes."),
    ] = None,
    prefill_step_size: Annotated[
        int, typer.Option("--prefill-step-size", help="Prompt tokens per prefill step.")
    ] = DEFAULT_PREFILL_STEP_SIZE,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
) -> None:
    checks = {
        "--port": 0 <= port <= 65535,
        "--max-tokens": max_tokens >= 1,
        "--max-batch": max_batch >= 1,
        "--image-timeout": image_timeout > 0,
        "--max-image-bytes": max_image_bytes >= 1,
        "--max-image-pixels": max_image_pixels >= 1,
        "--max-body-bytes": max_body_bytes >= 1,
        "--prompt-cache-bytes": prompt_cache_bytes >= 0,
        "--prefill-step-size": prefill_step_size >= 1,
    }
    for name, ok in checks.items():
        if not ok:
            raise UserError(f"{name} is out of range")
    from .app import Server, model_aliases
    from .images import ImageLimits

    loaded, processor = cli.load_model(model, adapter_path)
    if feature_cache_bytes is not None:
        from ..generation.features import feature_cache

        feature_cache(loaded).max_bytes = feature_cache_bytes
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        server = Server(
            loaded,
            processor,
            model_name or model,
            host=host,
            port=port,
            api_key=key,
            aliases=model_aliases(model) if model_name is None else (),
            image_limits=ImageLimits(
                max_image_bytes, max_image_pixels, image_timeout, allow_local_images
            ),
            max_body_bytes=max_body_bytes,
            default_max_tokens=max_tokens,
            max_batch=max_batch,
            prefix_cache_bytes=prompt_cache_bytes,
            prefill_step_size=prefill_step_size,
            log_requests=verbose,
        )
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    print(
        f"mlx_llama3v.server: serving {server.model_id!r} on {server.url} "
        f"(chat page: {server.url}/)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def main() -> None:
    run_app(app, "mlx_llama3v.server")


if __name__ == "__main__":
    main()
