"""OpenAI's chat-completions request, checked field by field, and its response shapes.

``parse_request`` turns a JSON body into a ``ChatRequest`` or raises ``APIError``
(status, message, ``param``, ``code``: OpenAI's error shape, ``error_body``). Fields
read: ``model``, ``messages`` (roles system / user / assistant; content a string or
parts of type ``text`` and ``image_url``), ``stream``, ``stream_options.include_usage``,
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``,
``seed``, ``n`` (1 only), and the extensions ``top_k``, ``min_p`` and
``repetition_penalty``. Other OpenAI fields (``user``, ``logit_bias``...) are accepted
and ignored, as most OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from .engine import Sampling

MAX_STOP_STRINGS = 4


class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP status ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        type: Optional[str] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")


_ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    500: "server_error",
    503: "server_error",
}


def error_body(e: APIError) -> Dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def invalid(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class ImagePart:
    """An ``image_url`` content part, still to be fetched; ``where`` names it in errors.
    ``slot`` is its part in ``ChatRequest.messages``: the fetched image goes in
    ``slot["image"]``."""

    url: str
    where: str
    slot: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatRequest:
    model: str
    messages: List[Dict[str, Any]]  # processing.build_prompt's messages
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    max_tokens_given: bool = False
    images: List[ImagePart] = field(default_factory=list)


def parse_request(body: bytes, default_max_tokens: int) -> ChatRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object", code="invalid_json")

    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: the id of a model from GET /v1/models", "model")
    messages, images = _messages(data.get("messages"))

    n = data.get("n", 1)
    if n is not None and (_integer(n, "n") != 1):
        raise invalid("only n=1 is supported", "n", code="unsupported_value")
    stream = _boolean(data.get("stream", False), "stream")
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    include_usage = _boolean(
        (options or {}).get("include_usage", False), "stream_options.include_usage"
    )
    if options is not None and not stream:
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")

    max_tokens = data.get("max_completion_tokens")
    name = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, name = data.get("max_tokens"), "max_tokens"
    given = max_tokens is not None
    max_tokens = default_max_tokens if max_tokens is None else _integer(max_tokens, name, low=1)

    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(data.get("temperature"), "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(data.get("top_p"), "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        top_k=0 if data.get("top_k") is None else _integer(data["top_k"], "top_k", low=0),
        min_p=_number(data.get("min_p"), "min_p", 0.0, low=0.0, high=1.0),
        repetition_penalty=_optional_number(data.get("repetition_penalty"), "repetition_penalty"),
        seed=None if data.get("seed") is None else _integer(data["seed"], "seed"),
        stop=_stop(data.get("stop")),
    )
    return ChatRequest(model, messages, sampling, stream, include_usage, given, images)


def _messages(value) -> tuple:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list of messages", "messages")
    out, images = [], []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise invalid(
                f"{where}.role must be 'system', 'user' or 'assistant', got {role!r}",
                f"{where}.role",
            )
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise invalid(
                f"{where}.content must be a string or a list of parts", f"{where}.content"
            )
        parts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise invalid(f"{pwhere}.text must be a string", f"{pwhere}.text")
                parts.append({"type": "text", "text": text})
            elif kind == "image_url":
                if role != "user":
                    raise invalid(f"{pwhere}: images are only allowed in user messages", pwhere)
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str) or not url:
                    raise invalid(f"{pwhere}.image_url.url must be a string", f"{pwhere}.image_url")
                slot = {"type": "image", "image": None}
                images.append(ImagePart(url, f"{pwhere}.image_url", slot))
                parts.append(slot)
            else:
                raise invalid(
                    f"{pwhere}: unsupported content part type {kind!r} (use 'text' or 'image_url')",
                    f"{pwhere}.type",
                )
        out.append({"role": role, "content": parts})
    return out, images


def _boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {value!r}", name, code="invalid_type")
    return value


def _integer(value, name: str, low: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer, got {value!r}", name, code="invalid_type")
    if low is not None and value < low:
        raise invalid(f"'{name}' must be at least {low}, got {value}", name)
    return value


def _number(value, name, default, low, high, open_low=False) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"'{name}' must be a number, got {value!r}", name, code="invalid_type")
    if value < low or value > high or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise invalid(f"'{name}' must be in {bracket}{low:g}, {high:g}], got {value}", name)
    return float(value)


def _optional_number(value, name) -> Optional[float]:
    if value is None:
        return None
    number = _number(value, name, None, 0.0, float("inf"), open_low=True)
    return None if number == 1.0 else number


def _stop(value) -> List[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("'stop' must be a string or a list of strings", "stop", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
    return [s for s in stops if s]


# ------------------------------------------------------------------ responses
def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion(
    cid: str, model: str, text: str, finish: str, usage: Dict[str, Any]
) -> Dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
        ],
        "usage": usage,
    }


def chunk(
    cid: str,
    model: str,
    delta: Optional[Dict[str, Any]] = None,
    finish: Optional[str] = None,
    usage: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """A ``chat.completion.chunk``; with ``usage`` and no delta, the closing usage chunk."""
    choices: Sequence = []
    if delta is not None:
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": list(choices),
    }
    if usage is not None:
        body["usage"] = usage
    return body
