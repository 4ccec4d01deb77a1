"""The rows of a job's ``vars_file``: a CSV with a header, JSONL (one mapping a line), or a YAML
list of mappings. Each row is one combination of placeholders.

CSV and JSONL rows are read one at a time, as expansion consumes them: a file of a million rows
is walked, never held. A YAML file is parsed whole (YAML has no streaming form for a list of
mappings here); use CSV or JSONL for large sets. Problems raise :class:`ManifestError` naming
the file, the row's line and the column.
"""

from __future__ import annotations

import csv
import hashlib
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

from batcher import fastjson
from batcher.errors import ManifestError

CSV_SUFFIXES = (".csv",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
YAML_SUFFIXES = (".yaml", ".yml")
SUFFIXES = CSV_SUFFIXES + JSONL_SUFFIXES + YAML_SUFFIXES


@dataclass(frozen=True, slots=True)
class Row:
    """One row: the line it starts on (1-based) and its values as text."""

    line: int
    values: Mapping[str, str]


def iter_rows(path: Path) -> Iterator[Row]:
    """Every row of ``path``, in order; the kind of file comes from its suffix."""
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        return _csv_rows(path)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path)
    if suffix in YAML_SUFFIXES:
        return _yaml_rows(path)
    raise ManifestError(f"a vars_file must end in {', '.join(SUFFIXES)}", file=str(path))


def _error(path: Path, line: int | None, message: str, field: str | None = None) -> ManifestError:
    return ManifestError(message, file=str(path), line=line, field=field)


def _check_name(path: Path, line: int, name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise _error(path, line, "a column name must be a plain identifier (letters, digits, "
                     "_; not starting with a digit)", str(name))
    return name


def _text(path: Path, line: int, name: str, value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (Mapping, list)):
        raise _error(path, line, "values must be strings or numbers", name)
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (\ud800) that JSON can spell
        raise _error(path, line, "holds a character that is not valid Unicode (a lone "
                     "surrogate)", name) from None
    return _no_nul(path, line, name, text)


def _no_nul(path: Path, line: int, name: str, text: str) -> str:
    if "\x00" in text:  # never meant, and cut short or refused along the way
        raise _error(path, line, "holds a NUL character (\\x00)", name)
    return text


def _cell(path: Path, line: int, name: str, text: str) -> str:
    """A CSV cell: its line breaks are \\n whatever the file's line endings (a quoted cell
    keeps the file's own, CRLF after a re-save on Windows, which would change task ids)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _no_nul(path, line, name, text)


def is_blank(text: str) -> bool:
    """Whether ``text`` shows nothing: only whitespace, control characters (Cc: NUL, BEL) and
    format characters (Cf: a zero-width space, a byte order mark, a direction mark)."""
    if text.isprintable() and text.strip():
        return False  # the usual case, without a look at each character
    return all(char.isspace() or unicodedata.category(char) in ("Cc", "Cf") for char in text)


def _text_lines(path: Path, handle: IO[bytes]) -> Iterator[str]:
    """The lines of a CSV file as text, each decoded on its own: a byte that is not UTF-8 is
    reported on its own line (a text stream decodes ahead, in blocks)."""
    for number, raw in enumerate(handle, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _error(path, number, f"not UTF-8 text (byte {exc.start + 1} of the line)") \
                from None
        yield text.removeprefix("\ufeff") if number == 1 else text


def _csv_rows(path: Path) -> Iterator[Row]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _error(path, None, f"cannot read: {exc.strerror}") from None
    with handle:
        reader = csv.reader(_text_lines(path, handle))
        try:
            header = next(reader, None)
            if header is None:
                raise _error(path, None, "empty file: a CSV vars_file needs a header and rows")
            names = [_check_name(path, 1, name.strip()) for name in header]
            if len(set(names)) != len(names):
                raise _error(path, 1, "a column is named twice")
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # a blank line
                if len(fields) != len(names):
                    raise _error(path, line, f"{len(fields)} fields where the header has "
                                 f"{len(names)}")
                yield Row(line, {name: _cell(path, line, name, field)
                                 for name, field in zip(names, fields, strict=True)})
        except csv.Error as exc:
            raise _error(path, reader.line_num, f"not valid CSV: {exc}") from None


def _row_of(path: Path, line: int, data: Any) -> Row:
    if not isinstance(data, Mapping) or not data:
        raise _error(path, line, "each row must be a non-empty mapping of column: value")
    values = {}
    for name, value in data.items():
        values[_check_name(path, line, name)] = _text(path, line, name, value)
    return Row(line, values)


def _jsonl_rows(path: Path) -> Iterator[Row]:
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise _error(path, None, f"cannot read: {exc.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _error(path, number, f"not UTF-8 text (byte {exc.start + 1} of the "
                             "line)") from None
            try:
                data = fastjson.loads(raw)
            except ValueError as exc:
                raise _error(path, number, f"not valid JSON: {exc}") from None
            yield _row_of(path, number, data)


def _yaml_rows(path: Path) -> Iterator[Row]:
    from batcher.manifest import load_yaml_with_lines  # the manifest's loader: lines, safety

    data = load_yaml_with_lines(path)
    if not isinstance(data, list):
        raise _error(path, None, "a YAML vars_file must be a list of mappings")
    for index, item in enumerate(data):
        line = getattr(item, "line", None)  # a mapping knows its line; a stray scalar does not
        if line is None:
            raise _error(path, None, f"row {index + 1}: each row must be a non-empty mapping "
                         "of column: value")
        yield _row_of(path, line, item)


def _no_value(path: Path, line: int, name: str) -> NoReturn:
    raise _error(path, line, f"no value for {{{name}}}, which the job's prompts, system or "
                 "images use", name)


def check_rows(
    path: Path, uses: list[frozenset[str]], var_names: frozenset[str],
    check_row: Callable[[Row], bytes] | None, image_only: frozenset[str] = frozenset(),
) -> None:
    """Read the file once: each row has a value for every placeholder a template takes from it
    (``uses``: per template, the names not under ``vars``), no row repeats an earlier row's
    values for what a template uses (the two would be the same tasks), no column is also a var,
    and ``check_row`` passes (the row's input images). ``check_row`` returns what a task id
    knows of the row's images (their content), which stands for the names only images use
    (``image_only``): two rows naming different files of the same bytes are the same tasks.
    An empty cell, or one that shows nothing (:func:`is_blank`), is no value.
    Memory: 8 bytes and a set entry a row.
    """
    seen: list[set[bytes]] = [set() for _ in uses]
    ordered = [sorted(used) for used in uses]
    needed = sorted(set().union(*uses))
    checked: Any = None  # the last row's columns, checked (a CSV's are the header's)
    count = 0
    for row in iter_rows(path):
        count += 1
        columns = row.values.keys()
        if columns != checked:
            clash = var_names & columns
            if clash:
                raise _error(path, row.line, "is also a var under vars; rename one", min(clash))
            for used in uses:
                missing = used - columns
                if missing:
                    _no_value(path, row.line, min(missing))
            checked = columns
        for name in needed:  # an empty cell would make "a  Teak Spoon": no value either
            if is_blank(row.values[name]):
                _no_value(path, row.line, name)
        images = check_row(row) if check_row is not None else b""
        for names, keys in zip(ordered, seen, strict=True):
            values = [row.values[n] for n in names if n not in image_only]
            key = hashlib.blake2b(fastjson.dumps_bytes(values) + images,
                                  digest_size=8).digest()
            if key in keys:
                what = ", ".join(names) + (" (its input images by content)" if images else "")
                raise _error(path, row.line, f"repeats an earlier row's values for {what}: "
                             "both rows would make the same tasks")
            keys.add(key)
    if not count:
        raise _error(path, None, "empty file: a vars_file needs at least one row")
