"""YAML read safely, each mapping remembering the line of each of its keys, and YAML errors
put as a user can act on them (file, line, column)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from batcher.errors import ManifestError


class LinedMapping(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int | None = None
    lines: dict[str, int]
    inherited: frozenset[str] = frozenset()  # a job's keys that came from defaults


# libyaml's parser when PyYAML was built with it (ten times faster on a long list of values);
# either way the constructor is PyYAML's safe one, in Python, with the hook below.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeLoader):  # type: ignore[valid-type, misc]
    """The safe loader, recording where each mapping key stands in the file."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LinedMapping:
    loader.flatten_mapping(node)
    result = LinedMapping()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ManifestError(
                "keys must be strings", file=loader.name, line=key_node.start_mark.line + 1,
                field=str(key),
            )
        if key in result:
            raise ManifestError(
                "appears twice in the same mapping", file=loader.name,
                line=key_node.start_mark.line + 1, field=key,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = key_node.start_mark.line + 1
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError("no such file", file=str(path)) from None
    except OSError as exc:
        raise ManifestError(f"cannot read: {exc}", file=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:  # reported on the line that holds the byte
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        raise ManifestError(f"not UTF-8 text (byte {exc.start - line_start + 1} of the line)",
                            file=str(path), line=data.count(b"\n", 0, exc.start) + 1) from None


MAX_DEPTH = 64  # a manifest needs a handful of levels; deeper is a mistake or an attack
_TOO_DEEP = "nested too deeply to be a manifest"


def load_yaml(path: Path) -> Any:
    text = _read_text(path)
    loader = None
    try:
        if _SafeLoader is not yaml.SafeLoader:
            _check_depth(text, path)
        loader = _LineLoader(text)
        loader.name = str(path)
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = _yaml_mark(exc, len(text))
        line = mark.line + 1 if mark else None
        column = mark.column + 1 if mark else None
        raise ManifestError(_yaml_problem(exc, line, column), file=str(path),
                            line=line) from None
    except yaml.reader.ReaderError as exc:  # a control character, say
        line, column = _reader_place(text, exc.position)
        raise ManifestError(f"unacceptable character #x{exc.character:04x} ({exc.reason}; "
                            f"column {column})", file=str(path), line=line) from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"invalid YAML: {exc}", file=str(path)) from None
    except RecursionError:
        raise ManifestError(_TOO_DEEP, file=str(path)) from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml_with_lines(path: Path) -> Any:
    """A YAML file loaded safely, its mappings remembering their lines (for vars files)."""
    return load_yaml(path)


def _check_depth(text: str, path: Path) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH`` before libyaml builds the nodes: it builds
    them by recursion in C, where a deep enough file crashes the process instead of raising.
    Walking the events is not recursive."""
    depth = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise ManifestError(_TOO_DEEP, file=str(path),
                                    line=mark.line + 1 if mark is not None else None)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _reader_place(text: str, position: int) -> tuple[int, int]:
    """The line and column of a character the reader refused; libyaml counts its position
    in bytes, PyYAML in characters."""
    if _SafeLoader is not yaml.SafeLoader:
        head = text.encode("utf-8", "surrogatepass")[:position]
        text, position = head.decode("utf-8", "replace"), len(head.decode("utf-8", "replace"))
    line_start = text.rfind("\n", 0, position) + 1
    return text.count("\n", 0, position) + 1, position - line_start + 1


def _yaml_mark(exc: yaml.MarkedYAMLError, length: int) -> Any:
    # At the end of the file the problem's own place says little: an unclosed quote or bracket
    # is found where the file ends; the context names where it was opened.
    mark = exc.problem_mark
    if exc.context_mark is not None and (mark is None or mark.index >= length - 1):
        mark = exc.context_mark
    return mark


def _yaml_problem(exc: yaml.MarkedYAMLError, line: int | None, column: int | None) -> str:
    """What is wrong, then where on the line (the line itself goes before, as file:line:)."""
    problem = exc.problem or "invalid YAML"
    if "could not determine a constructor" in problem:
        problem = "this tag is not allowed (batcher loads YAML safely: plain data only)"
    notes = [f"column {column}"] if column is not None else []
    if exc.context:
        opened = exc.context_mark.line + 1 if exc.context_mark is not None else line
        notes.append(f"{exc.context} begun on line {opened}" if opened != line else exc.context)
    return f"{problem} ({'; '.join(notes)})" if notes else problem
