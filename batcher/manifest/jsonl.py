"""JSONL task files: one task per line, in batcher's own form or the OpenAI Batch input form.

:func:`iter_jsonl` parses a file line by line and normalises each line to a :class:`JsonlTask`;
the validator and the task expansion both use it, so a file of a million lines is never held in
memory. A bad line raises :class:`~batcher.errors.ManifestError` as ``file:line: field: ...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher import fastjson
from batcher.errors import ManifestError
from batcher.imagerefs import check_local, parse_ref
from batcher.providers.config import ProviderConfig
from batcher.providers.rules import check_params
from batcher.wording import plural

log = logging.getLogger(__name__)
JOB_TYPES = ("image", "chat")
#: Body fields that change how a result travels, not what it is: they stay out of task ids.
TRANSPORT_FIELDS = frozenset({"response_format", "stream", "stream_options"})
#: Fields of the request body that batcher fills itself; params may not set them.
RESERVED_PARAMS = {"model", "prompt", "messages", "images"}


@dataclass(frozen=True, slots=True)
class JsonlTask:
    """One validated JSONL line, normalised from batcher's form or the OpenAI Batch form."""

    line: int
    id: str | None
    type: str
    model: str
    prompt: str
    messages: tuple[Mapping[str, Any], ...] | None
    seed: int | None
    params: Mapping[str, Any]
    images: tuple[str, ...]
    system: str | None
    id_field: str = "id"  # "custom_id" in the OpenAI Batch form: errors name it as written


_BATCH_URLS = {"/v1/chat/completions": "chat", "/v1/images/generations": "image",
               "/chat/completions": "chat", "/images/generations": "image"}
_OWN_FIELDS = {"id", "type", "model", "prompt", "seed", "params", "images", "system", "messages"}


def iter_jsonl(path: Path) -> Iterator[JsonlTask]:
    """Parse a JSONL task file line by line; a bad line raises ``ManifestError`` (file:line)."""
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc}", file=str(path)) from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise ManifestError("not UTF-8 text", file=str(path), line=number) from None
            except json.JSONDecodeError as exc:
                raise ManifestError(f"not valid JSON ({exc.msg})", file=str(path),
                                    line=number) from None
            except (ValueError, RecursionError) as exc:  # e.g. a 5000-digit number
                raise ManifestError(f"not usable JSON ({exc})", file=str(path),
                                    line=number) from None
            if not isinstance(data, dict):
                raise ManifestError("each line must be a JSON object", file=str(path), line=number)
            if (found := fastjson.unsendable(data)) is not None:
                field, problem = found
                raise ManifestError(problem, file=str(path), line=number, field=field)
            try:
                yield _batch_line(data, number) if "custom_id" in data else _own_line(data, number)
            except _LineError as exc:
                raise ManifestError(exc.message, file=str(path), line=number,
                                    field=exc.field) from None


class UserIds:
    """The ids users gave (``id``, ``custom_id``) in the task files of one manifest: a task's
    id is its user id, whatever its job, so an id used twice would make two tasks one.

    Holds a 64-bit digest of each id, not the id: a million ids took 73 MB at peak (a set of
    the id strings alone takes 100 MB; ``python bench/user_ids.py`` measures it). When a
    digest repeats, the files read so far are read again to find the line that used the id
    first, so two ids that only share a digest are not taken for one.
    """

    def __init__(self) -> None:
        self._digests: set[int] = set()
        self._files: list[Path] = []

    def add(self, path: Path, task: JsonlTask) -> None:
        """Note ``task``'s id; raises ``ManifestError`` at its line when an earlier line (of
        this file or another) has it."""
        assert task.id is not None
        digest = int.from_bytes(hashlib.blake2b(
            task.id.encode("utf-8", "surrogatepass"), digest_size=8).digest())
        if digest in self._digests:
            first = self._first_use(task.id, path, task.line)
            if first is not None:
                raise ManifestError(f"{task.id!r} is already the id of {first}",
                                    file=str(path), line=task.line, field=task.id_field)
        self._digests.add(digest)
        if not self._files or self._files[-1] != path:
            self._files.append(path)

    def _first_use(self, task_id: str, path: Path, line: int) -> str | None:
        for earlier in self._files:
            for other in iter_jsonl(earlier):
                if earlier == path and other.line >= line:
                    break
                if other.id == task_id:
                    return f"line {other.line}" if earlier == path else \
                        f"{earlier}:{other.line}"
        return None


def check_jsonl(path: Path, *, max_input_bytes: int,
                provider: ProviderConfig | None = None, ids: UserIds | None = None) -> int:
    """Validate every line of a JSONL task file; returns the number of tasks.

    Local input images must be images of at most ``max_input_bytes`` (the provider's). With
    ``provider``, params are checked against what it documents (providers/rules.py): a value
    it would refuse is an error; an undocumented parameter a warning, logged once per field.

    Two lines asking for the same result without ids would be one task twice over: an error;
    so is an id used twice, in this file or in another whose ids went into ``ids``.
    """
    ids = UserIds() if ids is None else ids
    same: dict[bytes, int] = {}  # digest of what shapes a line's result -> its line
    warned: dict[str, list[Any]] = {}  # field -> [first line, lines, message]
    count = 0
    for task in iter_jsonl(path):
        if task.id is not None:
            ids.add(path, task)
        else:
            digest = _shape_digest(task)
            if digest in same:
                raise ManifestError(
                    f"asks for the same result as line {same[digest]}; give each line an "
                    "\"id\" to run both", file=str(path), line=task.line)
            same[digest] = task.line
        for index, ref in enumerate(task.images):
            try:
                check_local(parse_ref(ref), path.parent, max_input_bytes)
            except ValueError as exc:
                raise ManifestError(str(exc), file=str(path), line=task.line,
                                    field=f"images[{index}]") from None
        if provider is not None:
            _check_rules(path, task, provider, warned)
        count += 1
    for field, (line, lines, message) in warned.items():
        more = f" (and {plural(lines - 1, 'more line')})" if lines > 1 else ""
        log.warning("warning: %s", ManifestError(message + more, file=str(path), line=line,
                                                 field=field))
    return count


def _check_rules(path: Path, task: JsonlTask, provider: ProviderConfig,
                 warned: dict[str, list[Any]]) -> None:
    """Raise on a param the provider would refuse; count the undocumented ones by field."""
    for problem in check_params(provider, task.type, (task.model,), task.params):
        field = f"{'body' if task.id_field == 'custom_id' else 'params'}.{problem.field}"
        if problem.error:
            raise ManifestError(problem.message, file=str(path), line=task.line, field=field)
        warned.setdefault(field, [task.line, 0, problem.message])[1] += 1


def _shape_digest(task: JsonlTask) -> bytes:
    params = {k: v for k, v in task.params.items() if k not in TRANSPORT_FIELDS}
    shape = [task.type, task.model, task.prompt, task.messages, task.seed, params, task.images,
             task.system]
    return hashlib.blake2b(json.dumps(shape, sort_keys=True).encode(), digest_size=12).digest()


class _LineError(Exception):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message


def _text(data: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = data.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _LineError(key, "required: a non-empty string")
    return value


def _seed(data: Mapping[str, Any]) -> int | None:
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _LineError("seed", "must be an integer")
    return seed


def _images(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise _LineError("images", "must be a list of file paths, URLs or data URIs")
    for index, entry in enumerate(value):
        try:
            parse_ref(entry)
        except ValueError as exc:
            raise _LineError(f"images[{index}]", str(exc)) from None
    return tuple(value)


def _messages(value: Any) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list) or not value:
        raise _LineError("messages", "must be a non-empty list of {role, content}")
    for message in value:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _LineError("messages", "each message needs a role and a content")
    return tuple(value)


def last_user_text(messages: tuple[Mapping[str, Any], ...]) -> str:
    """The text of the last user message (joined text parts), for slugs and reports."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            return str(content)
    return str(messages[-1].get("content", ""))


def _own_line(data: dict[str, Any], number: int) -> JsonlTask:
    for key in data:
        if key not in _OWN_FIELDS:
            raise _LineError(key, "unknown field")
    task_id = data.get("id")
    if task_id is not None and (not isinstance(task_id, str) or not task_id):
        raise _LineError("id", "must be a non-empty string")
    kind = data.get("type", "image")
    if kind not in JOB_TYPES:
        raise _LineError("type", f"must be image or chat, not {kind!r}")
    model = _text(data, "model")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise _LineError("params", "must be an object")
    for key in params:
        if key in RESERVED_PARAMS | {"seed"}:
            raise _LineError(f"params.{key}", "is set by batcher; use the top-level field")
    messages = _messages(data["messages"]) if "messages" in data else None
    prompt = _text(data, "prompt", required=messages is None)
    if kind == "image" and prompt is None:
        raise _LineError("prompt", "an image task needs a prompt")
    system = _text(data, "system", required=False)
    images = _images(data.get("images"))
    if images and kind != "image":
        raise _LineError("images", "only image tasks take input images")
    return JsonlTask(
        line=number, id=task_id, type=kind, model=model or "", prompt=prompt or "",
        messages=messages, seed=_seed(data), params=params, images=images, system=system,
    )


def _batch_line(data: dict[str, Any], number: int) -> JsonlTask:
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError("custom_id", "must be a non-empty string")
    if data.get("method", "POST") != "POST":
        raise _LineError("method", "only POST is supported")
    kind = _BATCH_URLS.get(str(data.get("url")))
    if kind is None:
        raise _LineError("url", "must be /v1/chat/completions or /v1/images/generations")
    body = data.get("body")
    if not isinstance(body, dict):
        raise _LineError("body", "must be an object")
    model = _text(body, "model")
    params = {k: v for k, v in body.items() if k not in {"model", "messages", "prompt", "seed",
                                                        "images"}}
    images: tuple[str, ...] = ()
    if kind == "chat":
        messages = _messages(body.get("messages"))
        prompt = last_user_text(messages)
    else:
        messages, prompt = None, _text(body, "prompt") or ""
        images = _images(body.get("images"))
    return JsonlTask(
        line=number, id=custom_id, type=kind, model=model or "", prompt=prompt,
        messages=messages, seed=_seed(body), params=params, images=images, system=None,
        id_field="custom_id",
    )
