"""JSONL task files: one task per line, in batcher's own form or the OpenAI Batch input form.

:func:`iter_jsonl` parses a file line by line and normalises each line to a :class:`JsonlTask`;
the validator and the task expansion both use it, so a file of a million lines is never held in
memory. A bad line raises :class:`~batcher.errors.ManifestError` as ``file:line: field: ...``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
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
            if number == 1:  # a byte order mark, as some editors save UTF-8
                raw = raw.removeprefix(b"\xef\xbb\xbf")
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


#: What batcher's own task ids look like (tasks.ID_LENGTH hex characters of a sha256): a user
#: id of that form may be the computed id of another task of the manifest.
COMPUTED_ID = re.compile(r"[0-9a-f]{32}")

Listing = tuple[str | None, Path]  # a job's name (None: a bare task file) and its task file


class UserIds:
    """The ids users gave (``id``, ``custom_id``) in the task files of one manifest: a task's
    id is its user id, whatever its job, so an id used twice would make two tasks one.

    Holds a 64-bit digest of each id, not the id: a million ids took 73 MB at peak (a set of
    the id strings alone takes 100 MB; ``python bench/user_ids.py`` measures it). When a
    digest repeats, the listings read so far (a job and its file: one file read by two jobs is
    two listings) are read again to find the line that used the id first, so two ids that
    only share a digest are not taken for one; a real repeat stops the check there, so the
    files are read again at most once.

    :meth:`find_computed` then checks the ids batcher computes for the other tasks against
    the same digests: a user id copied from results.jsonl would be a second task's id.
    """

    def __init__(self) -> None:
        self._digests: set[int] = set()
        self._listings: list[Listing] = []
        self.hashlike = 0  # user ids of the form of a computed id
        self.with_computed: set[Listing] = set()  # listings with lines without an id

    def add(self, path: Path, task: JsonlTask, job: str | None = None) -> None:
        """Note ``task``'s id, read by ``job`` from ``path``; raises ``ManifestError`` at its
        line when an earlier line (of this listing or an earlier one) has it."""
        assert task.id is not None
        listing = (job, path)
        if not self._listings or self._listings[-1] != listing:
            self._listings.append(listing)
        digest = _id_digest(task.id)
        if digest in self._digests:
            first = self._find(task.id, until=(listing, task.line))
            if first is not None:
                raise ManifestError(f"{task.id!r} is already the id of "
                                    f"{self._where(first, listing)}",
                                    file=str(path), line=task.line, field=task.id_field)
        self._digests.add(digest)
        if COMPUTED_ID.fullmatch(task.id):
            self.hashlike += 1

    def find_computed(self, task_id: str) -> tuple[Path, JsonlTask] | None:
        """The line whose user id is ``task_id``, an id batcher computed for another task."""
        if _id_digest(task_id) not in self._digests:
            return None
        found = self._find(task_id, until=None)
        return None if found is None else (found[0][1], found[1])

    def _find(self, task_id: str, until: tuple[Listing, int] | None
              ) -> tuple[Listing, JsonlTask] | None:
        """The first line with ``task_id``, before line ``until`` of its listing."""
        for listing in self._listings:
            for other in iter_jsonl(listing[1]):
                if until is not None and listing == until[0] and other.line >= until[1]:
                    return None
                if other.id == task_id:
                    return listing, other
        return None

    @staticmethod
    def _where(first: tuple[Listing, JsonlTask], listing: Listing) -> str:
        (job, path), other = first
        if (job, path) == listing:
            return f"line {other.line}"
        if path == listing[1]:
            return (f"{path}:{other.line} in job {job}: a file with ids gives its tasks to one "
                    "job only (copy it, or drop the ids)")
        return f"{path}:{other.line}"


def _id_digest(task_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(task_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest())


def check_jsonl(path: Path, *, max_input_bytes: int, provider: ProviderConfig | None = None,
                ids: UserIds | None = None, job: str | None = None) -> int:
    """Validate every line of a JSONL task file; returns the number of tasks.

    Local input images must be images of at most ``max_input_bytes`` (the provider's). With
    ``provider``, params are checked against what it documents (providers/rules.py): a value
    it would refuse is an error; an undocumented parameter a warning, logged once per field.

    Two lines asking for the same result without ids would be one task twice over: an error;
    so is an id used twice, in this file or in another whose ids went into ``ids`` (``job``
    names the job reading the file: one file read by two jobs gives its ids twice).
    """
    ids = UserIds() if ids is None else ids
    same: dict[bytes, int] = {}  # digest of what shapes a line's result -> its line
    warned: dict[str, list[Any]] = {}  # field -> [first line, lines, message]
    count = 0
    for task in iter_jsonl(path):
        if task.id is not None:
            ids.add(path, task, job)
        else:
            ids.with_computed.add((job, path))
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
