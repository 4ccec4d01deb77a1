"""The helpers every field check uses: where a value was read (file, line, the field as the
user wrote it), and the checks of kinds, names and lists."""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batcher.errors import ManifestError
from batcher.manifest.yamllines import LinedMapping

NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(slots=True)
class Where:
    """The file and mapping a value was read from, for error messages."""

    file: str
    mapping: Mapping[str, Any] | None = None
    prefix: str = ""

    def line(self, key: str | None = None) -> int | None:
        if isinstance(self.mapping, LinedMapping):
            lines = self.mapping.lines
            if key is not None:
                top = re.split(r"[.\[]", key, maxsplit=1)[0]  # "stop" of "stop[1]"
                for name in (key, top):
                    if name in lines:
                        return lines[name]
            return self.mapping.line
        return None

    def field(self, key: str) -> str:
        """The field as the user wrote it: a job's value taken from defaults is named there."""
        top = re.split(r"[.\[]", key, maxsplit=1)[0]
        if isinstance(self.mapping, LinedMapping) and top in self.mapping.inherited:
            return f"defaults.{key}"
        return f"{self.prefix}{key}"

    def error(self, key: str | None, message: str) -> ManifestError:
        name = self.field(key) if key else (self.prefix.rstrip(".") or None)
        return ManifestError(message, file=self.file, line=self.line(key), field=name)

    def child(self, key: str, mapping: Any) -> Where:
        sub = mapping if isinstance(mapping, Mapping) else None
        where = Where(self.file, sub, f"{self.field(key)}.")
        if sub is None or not isinstance(sub, LinedMapping):
            # Point at the parent key when the child carries no lines of its own.
            where.mapping = LinedMapping()
            where.mapping.line = self.line(key)
            where.mapping.lines = {}
        return where


def require_mapping(value: Any, where: Where, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(key, f"must be a mapping, not {kind_of(value)}")
    return value


def check_fields(data: Mapping[str, Any], allowed: set[str], where: Where) -> None:
    for key in data:
        if key not in allowed:
            raise where.error(key, f"unknown field (expected one of: {', '.join(sorted(allowed))})")


def kind_of(value: Any) -> str:
    return {
        type(None): "nothing", bool: "a boolean", int: "a number", float: "a number",
        str: "a string", list: "a list",
    }.get(type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__)


NAME_CHARS = "letters, digits, '.', '_' and '-'"


def checked_name(value: Any, where: Where, key: str) -> str:
    if value is None:
        raise where.error(key, f"required; {NAME_CHARS} only")
    if not isinstance(value, str):
        raise where.error(key, f"must be a name of {NAME_CHARS}, not {kind_of(value)}")
    if value in {".", ".."}:
        raise where.error(key, f"{value!r} names a folder; use {NAME_CHARS}")
    if not NAME_RE.match(value):
        raise where.error(key, f"{value!r}: a name takes only {NAME_CHARS} (no spaces)")
    return value


def string_list(data: Mapping[str, Any], one: str, many: str, where: Where) -> tuple[str, ...]:
    if one in data and many in data:
        raise where.error(many, f"give either {one} or {many}, not both")
    if one in data:
        values, key = [data[one]], one
    elif many in data:
        values, key = data[many], many
        if not isinstance(values, list) or not values:
            raise where.error(key, "must be a non-empty list")
    else:
        raise where.error(None, f"{one} or {many} is required")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise where.error(key, "each entry must be a non-empty string")
    if len(set(values)) != len(values):
        raise where.error(key, "an entry is listed twice")
    return tuple(values)


def placeholders(text: str) -> set[str]:
    """The ``{names}`` a template uses; ``{{`` and ``}}`` are literal braces."""
    names: set[str] = set()
    for _, name, spec, conversion in string.Formatter().parse(text):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(f"{{{name}}} is not a plain {{placeholder}}")
        names.add(name)
    return names
