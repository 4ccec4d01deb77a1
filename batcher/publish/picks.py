"""A person's picks and rejects: ``<manifest stem>.picks.yaml`` beside the manifest.

    A1: {pick: {seed: 1}}
    A2: {reject: [{seed: 0}, {model: flux.1-dev}]}

A selector names ``seed``, ``model`` and/or ``image`` (1-based, for ``n`` > 1); fields left out
match any variant. The file is YAML loaded safely; a mistake in it is a
:class:`~batcher.errors.ManifestError` naming the file, the line and the field. It is written
back (by the review page) sorted, one asset a line, through the one atomic writer, so that it
diffs well in review.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from batcher.errors import ManifestError
from batcher.manifest.fields import Where, kind_of
from batcher.store.atomic import atomic_open

SELECTOR_FIELDS = ("seed", "model", "image")
ENTRY_FIELDS = ("pick", "reject")


class Variant(Protocol):
    """What a selector looks at."""

    @property
    def seed(self) -> int | None: ...
    @property
    def model(self) -> str: ...
    @property
    def image(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Selector:
    """Which variants a pick or reject means; a field left out matches any."""

    seed: int | None = None
    model: str | None = None
    image: int | None = None

    def matches(self, variant: Variant) -> bool:
        return ((self.seed is None or self.seed == variant.seed)
                and (self.model is None or self.model == variant.model)
                and (self.image is None or self.image == variant.image))

    def as_dict(self) -> dict[str, Any]:
        values = {"seed": self.seed, "model": self.model, "image": self.image}
        return {key: value for key, value in values.items() if value is not None}

    def text(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.as_dict().items()) or "any variant"


@dataclass(frozen=True, slots=True)
class Decision:
    """What a person decided for one asset."""

    pick: Selector | None = None
    rejects: tuple[Selector, ...] = ()
    line: int | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.pick is not None:
            data["pick"] = self.pick.as_dict()
        if self.rejects:
            data["reject"] = [selector.as_dict() for selector in self.rejects]
        return data


def picks_path(manifest_path: Path) -> Path:
    """``jobs/x.yaml`` -> ``jobs/x.picks.yaml``."""
    return manifest_path.with_name(f"{manifest_path.stem}.picks.yaml")


def load_picks(path: Path) -> dict[str, Decision]:
    """The decisions in ``path`` by asset name; none when there is no such file."""
    from batcher.manifest.yamllines import load_yaml

    if not path.is_file():
        return {}
    data = load_yaml(path)
    if data is None:
        return {}
    where = Where(str(path), data if isinstance(data, Mapping) else None)
    if not isinstance(data, Mapping):
        raise ManifestError("a picks file is a mapping of asset names to {pick: ...} and "
                            "{reject: [...]}", file=str(path))
    return {name: _decision(entry, where, name) for name, entry in data.items()}


def _decision(entry: Any, where: Where, name: str) -> Decision:
    if not isinstance(entry, Mapping) or not entry:
        raise where.error(name, "must be a mapping: {pick: {seed: 1}} or "
                          "{reject: [{seed: 0}]}")
    sub = where.child(name, entry)
    for key in entry:
        if key not in ENTRY_FIELDS:
            raise sub.error(key, "unknown field (expected pick or reject)")
    pick = _selector(entry["pick"], sub, "pick") if "pick" in entry else None
    rejects: list[Selector] = []
    if "reject" in entry:
        values = entry["reject"]
        values = values if isinstance(values, list) else [values]
        rejects = [_selector(value, sub, f"reject[{index}]")
                   for index, value in enumerate(values)]
    return Decision(pick, tuple(rejects), where.line(name))


def _selector(value: Any, where: Where, key: str) -> Selector:
    if not isinstance(value, Mapping):
        raise where.error(key, f"must be a selector such as {{seed: 1}}, not {kind_of(value)}")
    sub = where.child(key, value)
    for name in value:
        if name not in SELECTOR_FIELDS:
            raise sub.error(name, "unknown field (expected seed, model or image)")
    seed, model, image = value.get("seed"), value.get("model"), value.get("image")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise sub.error("seed", f"must be a whole number, not {kind_of(seed)}")
    if model is not None and (not isinstance(model, str) or not model):
        raise sub.error("model", f"must be a model name, not {kind_of(model)}")
    if image is not None and (isinstance(image, bool) or not isinstance(image, int)
                              or image < 1):
        raise sub.error("image", "must be a whole number from 1 (the first image of a task)")
    return Selector(seed, model, image)


def render_picks(decisions: Mapping[str, Decision]) -> str:
    """The picks file's text: sorted by name, one asset a line."""
    return "".join(_entry_line(name, decisions[name]) for name in sorted(decisions)
                   if decisions[name].as_dict())


def _entry_line(name: str, decision: Decision) -> str:
    return yaml.safe_dump({name: decision.as_dict()}, default_flow_style=True,
                          width=1 << 16, sort_keys=False).strip().removeprefix("{") \
        .removesuffix("}") + "\n"


def save_decision(path: Path, before: Mapping[str, Decision], name: str,
                  after: Mapping[str, Decision]) -> None:
    """Write one asset's changed decision: only that entry's lines change (a new entry goes
    in sorted place), so a person's comments and layout stay. Should the result not read back
    as ``after`` (a layout this cannot edit line by line), the file is written whole, sorted,
    keeping its leading comment block."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    edited = _edit_entry(text, before, name, after.get(name))
    if edited is None or _reads_as(edited, after) is False:
        edited = _leading_comments(text) + render_picks(after)
    with atomic_open(path, "w") as handle:
        handle.write(edited)


def _edit_entry(text: str, before: Mapping[str, Decision], name: str,
                decision: Decision | None) -> str | None:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    if any(line.lstrip().startswith(("{", "---", "...", "%")) for line in lines
           if line[:1] not in {" ", "\t", "#", "\n", "\r"}):
        return None  # a flow mapping or a document marker: not one entry a line
    new = [_entry_line(name, decision)] if decision and decision.as_dict() else []
    old = before.get(name)
    if old is not None:
        if old.line is None:
            return None
        start = old.line - 1
        end = start + 1
        while end < len(lines) and lines[end][:1] in {" ", "\t"}:
            end += 1  # the entry's own indented lines
        return "".join(lines[:start] + new + lines[end:])
    later = [d.line for n, d in before.items() if n > name and d.line is not None]
    at = min(later) - 1 if later else len(lines)
    while later and at > 0 and lines[at - 1].startswith("#"):
        at -= 1  # above the next entry's comments
    return "".join(lines[:at] + new + lines[at:])


def _reads_as(text: str, decisions: Mapping[str, Decision]) -> bool:
    try:
        data = yaml.safe_load(text) or {}
        where = Where("", data if isinstance(data, Mapping) else None)
        return isinstance(data, Mapping) and \
            {n: _decision(e, where, n) for n, e in data.items()} == dict(decisions)
    except (yaml.YAMLError, ManifestError):
        return False


def _leading_comments(text: str) -> str:
    head = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#") and line.strip():
            break
        head.append(line if line.endswith("\n") else line + "\n")
    return "".join(head)


def save_picks(path: Path, decisions: Mapping[str, Decision]) -> None:
    """Write the picks file atomically (a reader sees the old file or the new, whole)."""
    with atomic_open(path, "w") as handle:
        handle.write(render_picks(decisions))
