"""Object-store URLs (``s3://bucket/prefix``, ``gs://``, ``az://``) told apart from folder paths."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batcher.errors import UsageError

SCHEMES = ("s3", "gs", "az")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """``scheme://bucket/prefix`` as a user wrote it (the prefix without slashes at its ends)."""

    scheme: str
    bucket: str
    prefix: str

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def title(self) -> str:
        """What a contact sheet calls this output: the prefix's last part, else the bucket."""
        return self.prefix.rsplit("/", 1)[-1] or self.bucket


def parse_store_url(text: str) -> StoreURL | None:
    """A store URL, or ``None`` when ``text`` is a folder path. A malformed URL is refused."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        if sep and "/" not in scheme:
            raise UsageError(f"{text}: unknown store scheme {scheme!r} (use one of "
                             f"{', '.join(s + '://' for s in SCHEMES)} or a folder path)")
        return None
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or (prefix and {"", ".", ".."} & set(prefix.split("/"))):
        raise UsageError(f"{text}: a store URL is {scheme}://BUCKET/PREFIX (no '.', '..' "
                         "or empty parts)")
    return StoreURL(scheme.lower(), bucket, prefix)


def output_target(text: str) -> Path | StoreURL:
    """Where a run writes: a store URL, or a folder (``~`` expanded)."""
    return parse_store_url(text) or Path(text).expanduser()


def beside(target: Path | StoreURL, name: str) -> str:
    """A file of an output, for messages: a folder's as a path (``results.jsonl`` in ``.``),
    a store's as a URL."""
    return str(target / name) if isinstance(target, Path) else f"{target}/{name}"
