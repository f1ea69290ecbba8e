"""The HTTP server and its routes, on the standard library's ``ThreadingHTTPServer``.

Each connection gets a thread (HTTP/1.1, keep-alive); the request threads parse and
check the request, fetch its images and build the prompt (tokenizer and image
preprocessing, numpy only), then hand a ``Job`` to the one engine thread that owns the
model (``engine``). Streaming answers go out as server-sent events in chunked
transfer encoding. While waiting for tokens the request thread watches its socket: a
client that has closed the connection is seen within ``POLL_SECONDS`` (or at the next
token), and its job is cancelled, which frees its slot in the batch.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, and the chat
page: ``GET /`` and ``GET /static/<file>``. With an API key, the ``/v1/`` routes need
``Authorization: Bearer KEY``; the page asks for the key and sends it.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from mlx_lm.generate import DEFAULT_PREFILL_STEP_SIZE

from ..generation.generate import ContextError
from ..processing import ImageError, PromptError
from .engine import DEFAULT_MAX_BATCH, Engine, Job
from .images import ImageLimits, fetch_image
from .schema import APIError, chunk, completion, completion_id, error_body, parse_request

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_MAX_TOKENS = 512
POLL_SECONDS = 0.05
# a body over the limit is read and dropped up to this size, so that the client,
# still sending, gets the 413 and not a reset connection
_DRAIN_LIMIT = 256 * 2**20

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}


class _HTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # a client closing its connection (e.g. a pooled keep-alive one) is not a fault:
        # the standard library would print a traceback for it
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Server:
    """One model served over HTTP: ``Server(...).start()`` or ``serve_forever()``.

    ``model_id`` is the name clients send as ``model`` (``aliases`` are accepted too).
    """

    def __init__(
        self,
        model,
        processor,
        model_id: str,
        *,
        host: str = "127.0.0.1",
        port: int = 8080,
        api_key: Optional[str] = None,
        aliases: Iterable[str] = (),
        image_limits: Optional[ImageLimits] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        max_batch: int = DEFAULT_MAX_BATCH,
        prefix_cache_bytes: Optional[int] = None,
        prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
        log_requests: bool = False,
    ):
        self.model_id = model_id
        self.model_names = {model_id, *aliases}
        self.processor = processor
        self.api_key = api_key
        self.image_limits = image_limits or ImageLimits()
        self.max_body_bytes = max_body_bytes
        self.default_max_tokens = default_max_tokens
        self.log_requests = log_requests
        self.created = int(time.time())
        # tokenizers and image preprocessing run in the request threads, one at a time
        self.processor_lock = threading.Lock()
        self.engine = Engine(
            model,
            processor,
            max_batch=max_batch,
            prefill_step_size=prefill_step_size,
            prefix_cache_bytes=prefix_cache_bytes,
        )
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def serve(model, processor, model_id: str = "model", **options) -> Server:
    """A ``Server`` already serving in a background thread (``port=0``: a free port)."""
    return Server(model, processor, model_id, **options).start()


class _Disconnected(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_llama3v.server"
    _streaming = False  # the 200 of an event stream has gone out

    @property
    def app(self) -> Server:
        return self.server.app

    def log_message(self, format, *args):
        if self.app.log_requests:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")

    # ---------------------------------------------------------------- routes
    def do_OPTIONS(self):
        self.send_response(HTTPStatus.NO_CONTENT)
        self._cors()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/") :])
            elif path == "/health":
                self._json(
                    200, {"status": "ok", "model": self.app.model_id, **self.app.engine.stats()}
                )
            elif path in ("/v1/models", "/v1/models/"):
                self._authorize()
                self._json(200, {"object": "list", "data": [self._model_card()]})
            elif path.startswith("/v1/models/"):
                self._authorize()
                self._check_model(path[len("/v1/models/") :])
                self._json(200, self._model_card())
            else:
                raise APIError(404, f"no route GET {path}", code="not_found")
        except APIError as e:
            self._error(e)

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        self._streaming = False
        try:
            if path not in ("/v1/chat/completions", "/chat/completions"):
                self._drop_body()
                raise APIError(404, f"no route POST {path}", code="not_found")
            self._authorize(drain=True)
            self._chat(self._body())
        except APIError as e:
            self._error(e)
        except _Disconnected:
            self.close_connection = True
        except Exception as e:  # a bug of ours: say so in one line, keep serving
            sys.stderr.write(f"error: {self.path}: {type(e).__name__}: {e}\n")
            self.close_connection = True
            if not self._streaming:
                self._error(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # ---------------------------------------------------------------- chat completions
    def _chat(self, body: bytes) -> None:
        app = self.app
        request = parse_request(body, app.default_max_tokens)
        self._check_model(request.model)
        for part in request.images:
            part.slot["image"] = fetch_image(part, app.image_limits)
        try:
            with app.processor_lock:
                inputs = app.processor(request.messages)
            request.sampling.max_tokens = app.engine.check_fits(inputs, request.sampling.max_tokens)
        except ContextError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ImageError as e:
            raise APIError(400, str(e), param="messages", code="invalid_image") from None
        except PromptError as e:
            raise APIError(400, str(e), param="messages", code="invalid_prompt") from None
        job = app.engine.submit(Job(inputs, request.sampling))
        try:
            if request.stream:
                self._stream(job, request)
            else:
                self._whole(job, request)
        finally:
            if not job.done:
                app.engine.cancel(job)

    def _whole(self, job: Job, request) -> None:
        pieces = []
        for event in job.stream(POLL_SECONDS, self._alive):
            if event.kind == "text":
                pieces.append(event.text)
            elif event.kind == "error":
                raise APIError(500, event.text, code="generation_failed")
            else:
                body = completion(
                    completion_id(),
                    self.app.model_id,
                    "".join(pieces),
                    event.finish_reason,
                    event.usage,
                )
                self._json(200, body)
                return
        raise _Disconnected()

    def _stream(self, job: Job, request) -> None:
        cid, model = completion_id(), self.app.model_id
        self.send_response(200)
        self._cors()
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._streaming = True
        self._event(chunk(cid, model, {"role": "assistant", "content": ""}))
        for event in job.stream(POLL_SECONDS, self._alive):
            if event.kind == "text":
                self._event(chunk(cid, model, {"content": event.text}))
            elif event.kind == "error":
                self._event(error_body(APIError(500, event.text, code="generation_failed")))
                break
            else:
                self._event(chunk(cid, model, {}, finish=event.finish_reason))
                if request.include_usage:
                    self._event(chunk(cid, model, usage=event.usage))
                break
        else:
            raise _Disconnected()
        self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")

    def _event(self, data: Dict[str, Any]) -> None:
        self._send_chunk(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")

    def _send_chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise _Disconnected() from None

    def _alive(self) -> bool:
        """False once the client has closed its end of the connection."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return True
            return self.connection.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    # ---------------------------------------------------------------- helpers
    def _model_card(self) -> Dict[str, Any]:
        return {
            "id": self.app.model_id,
            "object": "model",
            "created": self.app.created,
            "owned_by": "mlx_llama3v",
        }

    def _check_model(self, name: str) -> None:
        if name not in self.app.model_names:
            raise APIError(
                404,
                f"the model {name!r} does not exist on this server; "
                f"it serves {self.app.model_id!r}",
                param="model",
                code="model_not_found",
            )

    def _authorize(self, drain: bool = False) -> None:
        key = self.app.api_key
        if key is None:
            return
        given = self.headers.get("Authorization", "")
        if given != f"Bearer {key}":
            if drain:
                self._drop_body()
            raise APIError(
                401,
                "a valid API key is needed: send 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def _content_length(self) -> int:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise APIError(411, "the request needs a Content-Length header", code="length_required")
        return int(length)

    def _body(self) -> bytes:
        length = self._content_length()
        if length > self.app.max_body_bytes:
            self._drop_body(length)
            raise APIError(
                413,
                f"the request body is {length} bytes, over the server's limit of "
                f"{self.app.max_body_bytes} bytes (--max-body-bytes)",
                code="request_too_large",
            )
        return self.rfile.read(length)

    def _drop_body(self, length: Optional[int] = None) -> None:
        if length is None:
            try:
                length = self._content_length()
            except APIError:
                return
        if length > _DRAIN_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            piece = self.rfile.read(min(length, 1 << 20))
            if not piece:
                break
            length -= len(piece)

    def _static(self, name: str) -> None:
        if name not in _STATIC:
            raise APIError(404, f"no such file: {name}", code="not_found")
        data = resources.files(__package__).joinpath("static", name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", _STATIC[name])
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(data)

    def _cors(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")

    def _json(self, status: int, body: Dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self._cors()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _error(self, e: APIError) -> None:
        self._json(e.status, error_body(e))


def model_aliases(name: str) -> set:
    """Names a client may use for a model given as ``name`` (its folder's name too)."""
    path = Path(name).expanduser()
    aliases = {path.name} if path.name else set()
    if path.exists():
        aliases.add(str(path.resolve()))
    return aliases - {""}
