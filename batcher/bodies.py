"""Request bodies: a task turned into the JSON an OpenAI-compatible endpoint takes.

Local input images become ``data:`` URIs (read once, kept while a few jobs share them; the MIME
type from the bytes); URLs and data URIs pass through (see :mod:`batcher.imagerefs`). The
sidecar copy of a body names each input image by its sha256 instead of carrying the image again.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

from batcher.imagerefs import FILE, URL, as_data_uri, digest, parse_ref
from batcher.manifest.tasks import Task, chat_messages

_CACHE_SIZE = 16


class InputImages:
    """Turns a task's image references into what the API takes, caching the last few files."""

    def __init__(self) -> None:
        self._cache: OrderedDict[Path, tuple[str, str]] = OrderedDict()

    def data_uri(self, text: str, base_dir: Path | None) -> tuple[str, str]:
        """(what to send, how the sidecar names it)."""
        ref = parse_ref(text)
        if ref.kind != FILE:
            return text, text if ref.kind == URL else "sha256:" + digest(ref)
        path = ref.path(base_dir or Path.cwd())
        cached = self._cache.get(path)
        if cached is None:
            data = path.read_bytes()
            cached = (as_data_uri(data), "sha256:" + digest(ref, data))
            self._cache[path] = cached
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(path)
        return cached


def build_body(
    task: Task, images: InputImages, seed_param: str | None = "seed"
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the request body, a copy fit for the sidecar: input images named by hash).

    The seed goes in the provider's ``seed_param`` field; with none, it is left out (it still
    told the tasks apart)."""
    body: dict[str, Any] = {"model": task.model}
    if task.kind == "chat":
        body["messages"] = (
            list(task.messages) if task.messages is not None
            else chat_messages(task.prompt, task.system)
        )
    else:
        body["prompt"] = task.prompt
    body.update(task.params or {})
    if task.seed is not None and seed_param is not None:
        body[seed_param] = task.seed
    if not task.images:
        return body, body
    sent, named = zip(*(images.data_uri(ref, task.base_dir) for ref in task.images), strict=True)
    return {**body, "images": list(sent)}, {**body, "images": list(named)}
