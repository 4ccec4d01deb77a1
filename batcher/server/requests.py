"""What a request to the local server may say: the model and size lists, the OpenAI-shaped
``ApiError`` with its helpers, the request records and the pure checks that turn a JSON body into
one of them (raising a 400 ``ApiError`` when the real APIs would), and ``canonical_hash``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from batcher.imagegen import image_kind

EDIT_MODELS = frozenset({"black-forest-labs/flux-kontext-max/multi"})
IMAGE_MODELS = (
    "flux.1-schnell",
    "flux.1-dev",
    "stable-diffusion-3.5-medium",
    "black-forest-labs/flux-kontext-max/multi",
    "local-image",
)
CHAT_MODELS = (
    "llama-3.1-8b-instruct",
    "llama-3.1-70b-instruct",
    "llama-3.1-405b-instruct",
    "mixtral-8x7b-32768",
    "qwen-2-72b-instruct",
    "local-chat",
)
IMAGE_SIZES = ("256x256", "512x512", "1024x1024")


class ApiError(Exception):
    """An answer in the OpenAI error shape; raised by checks, turned into a response once."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - the OpenAI field name
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers or {}

    def response(self) -> web.Response:
        return web.json_response(self.body, status=self.status, headers=self.headers)


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _too_many(message: str, retry_after_ms: int) -> ApiError:
    # Both headers, as the real APIs send them: clients honour retry-after-ms first.
    headers = {"Retry-After": f"{retry_after_ms / 1000:.3f}", "retry-after-ms": str(retry_after_ms)}
    return ApiError(429, message, type="requests", code="rate_limit_exceeded", headers=headers)


def _server_error(status: int, message: str, code: str = "injected_fault") -> ApiError:
    return ApiError(status, message, type="server_error", code=code)


# --- request validation (pure) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImageRequest:
    model: str
    prompt: str
    n: int
    width: int
    height: int
    response_format: str
    seed: int | None
    inputs: tuple[str, ...]  # sha256 of each input image, for edit models

    def key(self, k: int) -> str:
        """The render key of image ``k``: the same request always yields the same pictures."""
        parts = [self.model, self.prompt, self.seed, self.width, self.height, k, self.inputs]
        return json.dumps(parts)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, text)
    max_tokens: int | None
    seed: int | None
    stream: bool
    n: int = 1  # choices to answer with


def canonical_hash(raw: bytes) -> str:
    """sha256 of a body's canonical JSON (sorted keys), or of its raw bytes if it is not JSON."""
    try:
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return hashlib.sha256(raw).hexdigest()
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise _invalid("The request body must be a JSON object.", None, "invalid_json")
    return body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_in(body: dict[str, Any], name: str, lo: int, hi: int | None, default: int | None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise _invalid(f"'{name}' must be an integer {bound}, got {value!r}.", name)
    return value


def _number_in(body: dict[str, Any], name: str, lo: float, hi: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise _invalid(f"'{name}' must be a number between {lo:g} and {hi:g}.", name)


def _model(body: dict[str, Any], wanted: tuple[str, ...], kind: str) -> str:
    model = body.get("model")
    if model is None:
        raise _invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str) or model not in IMAGE_MODELS + CHAT_MODELS:
        raise _invalid(f"The model '{model}' does not exist.", "model", "model_not_found")
    if model not in wanted:
        raise _invalid(f"The model '{model}' is not a {kind} model.", "model")
    return model


def _size(value: Any, max_side: int) -> tuple[int, int]:
    if value not in IMAGE_SIZES:
        raise _invalid(f"'{value}' is not one of {', '.join(IMAGE_SIZES)}.", "size")
    width, height = (min(int(side), max_side) for side in value.split("x"))
    return width, height


def _aspect_size(value: Any, max_side: int) -> tuple[int, int]:
    match = re.fullmatch(r"(\d{1,4}):(\d{1,4})", value) if isinstance(value, str) else None
    w, h = (int(match[1]), int(match[2])) if match else (0, 0)
    # Real edit models reject extreme ratios; 4:1 either way is a generous bound.
    if not (w and h and max(w, h) <= 4 * min(w, h)):
        raise _invalid(
            f"'aspect_ratio' must be 'W:H' no wider than 4:1, got {value!r}.", "aspect_ratio"
        )
    long_side = min(1024, max_side)
    short_side = max(1, round(long_side * min(w, h) / max(w, h)))
    return (long_side, short_side) if w >= h else (short_side, long_side)


_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,(.*)", re.DOTALL)


def _input_images(value: Any) -> tuple[str, ...]:
    if value is None:
        raise _invalid(
            "'images' is required for this model.", "images", "missing_required_parameter"
        )
    if not isinstance(value, list) or not value:
        raise _invalid("'images' must be a non-empty list of strings.", "images")
    digests = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item.startswith(("http://", "https://")):
            digests.append(hashlib.sha256(item.encode("utf-8")).hexdigest())
            continue
        match = _DATA_URI.fullmatch(item) if isinstance(item, str) else None
        try:
            data = base64.b64decode(match[1], validate=True) if match else b""
        except binascii.Error:
            data = b""
        if image_kind(data) is None:
            raise _invalid(
                f"images[{i}] is neither an http(s) URL nor a base64 data URI of a "
                "PNG, JPEG, GIF or WebP image.",
                "images",
            )
        digests.append(hashlib.sha256(data).hexdigest())
    return tuple(digests)


def parse_image_request(body: dict[str, Any], max_side: int) -> ImageRequest:
    """Validate an image generation body like the real APIs do; raise a 400 ApiError if wrong."""
    model = _model(body, IMAGE_MODELS, "image")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _invalid("'prompt' must be a non-empty string.", "prompt")
    n = _int_in(body, "n", 1, 4, 1)
    response_format = body.get("response_format") or "url"
    if response_format not in ("url", "b64_json"):
        raise _invalid(f"'{response_format}' is not one of url, b64_json.", "response_format")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _invalid("'seed' must be an integer.", "seed")
    _int_in(body, "steps", 1, 50, None)
    _number_in(body, "guidance_scale", 1, 10)
    if model in EDIT_MODELS:
        inputs = _input_images(body.get("images"))
        if body.get("size") is not None:
            width, height = _size(body["size"], max_side)
        else:
            width, height = _aspect_size(body.get("aspect_ratio") or "1:1", max_side)
    else:
        inputs = ()
        width, height = _size(body.get("size") or "1024x1024", max_side)
    return ImageRequest(model, prompt, n, width, height, response_format, seed, inputs)


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return " ".join(p["text"] for p in content if isinstance(p.get("text"), str))
    return None


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a chat completion body; raise a 400 ApiError if wrong."""
    model = _model(body, CHAT_MODELS, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("'messages' must be a non-empty list.", "messages")
    parsed = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        text = _message_text(message.get("content")) if isinstance(message, dict) else None
        if not isinstance(role, str) or text is None:
            raise _invalid(
                f"messages[{i}] must be an object with a 'role' and a 'content'.", "messages"
            )
        parsed.append((role, text))
    max_tokens = _int_in(body, "max_tokens", 1, None, None)
    _number_in(body, "temperature", 0, 2)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise _invalid("'seed' must be an integer.", "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _invalid("'stream' must be a boolean.", "stream")
    n = _int_in(body, "n", 1, 8, 1)
    return ChatRequest(model, tuple(parsed), max_tokens, seed, stream, n)
