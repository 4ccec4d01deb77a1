"""Load and validate manifests: YAML job files, and JSONL task files as whole manifests.

Everything here runs before a request is sent. A manifest that cannot be run raises
:class:`~batcher.errors.ManifestError` naming the file, the line and the field. The lines of a
JSONL file are parsed by :mod:`batcher.jsonl`.
"""

from __future__ import annotations

import itertools
import logging
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batcher import fastjson
from batcher.errors import ManifestError, UsageError
from batcher.imagerefs import check_local, parse_ref
from batcher.jsonl import JOB_TYPES, RESERVED_PARAMS, check_jsonl
from batcher.outputs import AS_DELIVERED, FORMATS, Outputs
from batcher.providers.config import ProviderConfig, builtin_providers, provider_from_mapping
from batcher.providers.prices import ANY_MODEL, PRICE_FIELDS, PriceList, price_from_mapping
from batcher.providers.rules import check_params
from batcher.store.url import parse_store_url

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
DEFAULT_JSONL_PROVIDER = "vultr"
TOP_FIELDS = {"name", "output", "providers", "defaults", "jobs", "budget"}
JOB_FIELDS = {
    "name", "type", "provider", "model", "models", "prompt", "prompts", "vars", "seeds",
    "images", "params", "system", "file", "vars_file", "outputs",
}
FILE_JOB_FIELDS = {"name", "file", "provider", "type", "outputs"}
OUTPUT_FIELDS = {"format", "quality", "sizes", "metadata"}
MAX_SIDE = 16384  # px: a resized copy's longest side


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job of a manifest, validated: either a prompt grid or a JSONL ``file`` of tasks."""

    name: str
    type: str
    provider: str
    line: int | None = None
    models: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()
    vars: tuple[tuple[str, tuple[str, ...]], ...] = ()
    seeds: tuple[int, ...] | None = None
    images: tuple[str, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)
    system: str | None = None
    file: Path | None = None
    vars_file: Path | None = None  # rows of placeholders (batcher.varsfile)
    outputs: Outputs | None = None  # files derived from each delivered image


@dataclass(frozen=True, slots=True)
class Manifest:
    """A whole manifest: where it came from, where it writes, its providers and jobs."""

    name: str
    path: Path
    output: str  # a folder path or an object-store URL (s3://, gs://, az://)
    providers: Mapping[str, ProviderConfig]
    jobs: tuple[JobSpec, ...]
    budget: float | None = None  # USD for one run

    @property
    def base_dir(self) -> Path:
        return self.path.parent


# --------------------------------------------------------------------------- YAML with lines


class _Mapping(dict[str, Any]):
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int | None = None
    lines: dict[str, int]
    inherited: frozenset[str] = frozenset()  # a job's keys that came from defaults


# libyaml's parser when PyYAML was built with it (ten times faster on a long list of values);
# either way the constructor is PyYAML's safe one, in Python, with the hook below.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LineLoader(_SafeLoader):  # type: ignore[valid-type, misc]
    """The safe loader, recording where each mapping key stands in the file."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    result = _Mapping()
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
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError("no such file", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read: {exc}", file=str(path)) from None


MAX_DEPTH = 64  # a manifest needs a handful of levels; deeper is a mistake or an attack
_TOO_DEEP = "nested too deeply to be a manifest"


def _load_yaml(path: Path) -> Any:
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
    return _load_yaml(path)


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


# --------------------------------------------------------------------------- validation helpers


@dataclass(slots=True)
class _Where:
    """The file and mapping a value was read from, for error messages."""

    file: str
    mapping: Mapping[str, Any] | None = None
    prefix: str = ""

    def line(self, key: str | None = None) -> int | None:
        if isinstance(self.mapping, _Mapping):
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
        if isinstance(self.mapping, _Mapping) and top in self.mapping.inherited:
            return f"defaults.{key}"
        return f"{self.prefix}{key}"

    def error(self, key: str | None, message: str) -> ManifestError:
        name = self.field(key) if key else (self.prefix.rstrip(".") or None)
        return ManifestError(message, file=self.file, line=self.line(key), field=name)

    def child(self, key: str, mapping: Any) -> _Where:
        sub = mapping if isinstance(mapping, Mapping) else None
        where = _Where(self.file, sub, f"{self.field(key)}.")
        if sub is None or not isinstance(sub, _Mapping):
            # Point at the parent key when the child carries no lines of its own.
            where.mapping = _Mapping()
            where.mapping.line = self.line(key)
            where.mapping.lines = {}
        return where


def _require_mapping(value: Any, where: _Where, key: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(key, f"must be a mapping, not {_kind(value)}")
    return value


def _check_fields(data: Mapping[str, Any], allowed: set[str], where: _Where) -> None:
    for key in data:
        if key not in allowed:
            raise where.error(key, f"unknown field (expected one of: {', '.join(sorted(allowed))})")


def _kind(value: Any) -> str:
    return {
        type(None): "nothing", bool: "a boolean", int: "a number", float: "a number",
        str: "a string", list: "a list",
    }.get(type(value), "a mapping" if isinstance(value, Mapping) else type(value).__name__)


_NAME_CHARS = "letters, digits, '.', '_' and '-'"


def _name(value: Any, where: _Where, key: str) -> str:
    if value is None:
        raise where.error(key, f"required; {_NAME_CHARS} only")
    if not isinstance(value, str):
        raise where.error(key, f"must be a name of {_NAME_CHARS}, not {_kind(value)}")
    if value in {".", ".."}:
        raise where.error(key, f"{value!r} names a folder; use {_NAME_CHARS}")
    if not NAME_RE.match(value):
        raise where.error(key, f"{value!r}: a name takes only {_NAME_CHARS} (no spaces)")
    return value


def _string_list(data: Mapping[str, Any], one: str, many: str, where: _Where) -> tuple[str, ...]:
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


# --------------------------------------------------------------------------- jobs


def _parse_vars(value: Any, where: _Where) -> tuple[tuple[str, tuple[str, ...]], ...]:
    data = _require_mapping(value, where, "vars")
    sub = where.child("vars", data)
    result = []
    for name, values in data.items():
        if not name.isidentifier():
            raise sub.error(name, "a var name must be a plain identifier")
        values = values if isinstance(values, list) else [values]
        if not values:
            raise sub.error(name, "must list at least one value")
        for item in values:
            if isinstance(item, (Mapping, list)) or item is None:
                raise sub.error(name, "values must be strings or numbers")
        texts = tuple(str(item) for item in values)
        if len(set(texts)) != len(texts):
            raise sub.error(name, "a value is listed twice")
        result.append((name, texts))
    return tuple(result)


def _parse_seeds(value: Any, where: _Where) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise where.error("seeds", "must be a count or a list of integers")
    if isinstance(value, int):
        if value < 1:
            raise where.error("seeds", "a count of seeds must be at least 1")
        return tuple(range(value))
    if isinstance(value, list) and value:
        if any(isinstance(s, bool) or not isinstance(s, int) for s in value):
            raise where.error("seeds", "each seed must be an integer")
        if len(set(value)) != len(value):
            raise where.error("seeds", "a seed is listed twice")
        return tuple(value)
    raise where.error("seeds", "must be a count (3 -> 0, 1, 2) or a non-empty list of integers")


def _parse_images(value: Any, where: _Where, base_dir: Path, max_bytes: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise where.error("images", "must be a non-empty list of files, http(s) URLs or data URIs")
    for index, entry in enumerate(value):
        try:
            if isinstance(entry, str) and placeholders(entry):
                continue  # a template: checked for each combination it is filled with
            check_local(parse_ref(entry), base_dir, max_bytes)
        except ValueError as exc:
            raise where.error(f"images[{index}]", str(exc)) from None
    return tuple(value)


def _parse_outputs(value: Any, where: _Where) -> Outputs:
    data = _require_mapping(value, where, "outputs")
    sub = where.child("outputs", data)
    _check_fields(data, OUTPUT_FIELDS, sub)
    fmt = data.get("format")
    if isinstance(fmt, str) and fmt.lower() == "jpg":
        fmt = "jpeg"
    if fmt is not None and not (isinstance(fmt, str) and fmt.lower() in (*FORMATS, *AS_DELIVERED)):
        raise sub.error("format", f"must be one of {', '.join(FORMATS)} (or leave it out: the "
                        f"image as delivered), not {fmt!r}")
    fmt = None if fmt is None or fmt.lower() in AS_DELIVERED else fmt.lower()
    quality = data.get("quality")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int)
                                or not 1 <= quality <= 100):
        raise sub.error("quality", f"must be a whole number from 1 to 100, not {quality!r}")
    sizes_data = _require_mapping(data.get("sizes", {}), sub, "sizes")
    sizes_where = sub.child("sizes", sizes_data)
    sizes = []
    for name, side in sizes_data.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise sizes_where.error(name, "a size's name goes into file names: a-z, 0-9, _ "
                                    "and - only, at most 32 characters")
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
            raise sizes_where.error(name, f"the longest side in px, a whole number from 1 to "
                                    f"{MAX_SIDE}, not {side!r}")
        sizes.append((name, side))
    metadata = data.get("metadata", False)
    if not isinstance(metadata, bool):
        raise sub.error("metadata", f"must be true or false, not {metadata!r}")
    if fmt is None and quality is not None and not sizes:
        raise sub.error("quality", "applies to a format or sizes; set format or sizes too")
    if fmt is None and metadata and not sizes:
        raise sub.error("metadata", "goes into derived files, and the image as delivered is "
                        "never rewritten: set format or sizes too")
    return Outputs(fmt, quality, tuple(sizes), metadata)


def _parse_vars_file(value: Any, where: _Where, base_dir: Path) -> Path:
    from batcher.varsfile import SUFFIXES

    if not isinstance(value, str) or not value:
        raise where.error("vars_file", "must be the path of a CSV, JSONL or YAML file")
    path = (base_dir / value).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise where.error("vars_file", f"{value}: must end in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise where.error("vars_file", f"{value}: no such file (paths are relative to the "
                          "manifest)")
    return path


def _parse_job(
    data: Mapping[str, Any], where: _Where, base_dir: Path, providers: Mapping[str, Any]
) -> JobSpec:
    _check_fields(data, JOB_FIELDS, where)
    name = _name(data.get("name"), where, "name")
    provider = data.get("provider")
    if not isinstance(provider, str) or provider not in providers:
        known = ", ".join(sorted(providers))
        raise where.error("provider", f"unknown provider {provider!r} (known: {known})")
    if "file" in data:
        return _parse_file_job(data, where, base_dir, name, provider)
    kind = data.get("type")
    if kind not in JOB_TYPES:
        raise where.error("type", f"must be image or chat, not {kind!r}")
    models = _string_list(data, "model", "models", where)
    prompts = _string_list(data, "prompt", "prompts", where)
    job_vars = _parse_vars(data["vars"], where) if "vars" in data else ()
    seeds = _parse_seeds(data["seeds"], where) if "seeds" in data else None
    raw_params = _require_mapping(data.get("params", {}), where, "params")
    params = dict(raw_params)
    reserved = RESERVED_PARAMS | ({"seed"} if seeds is not None else set())
    for key in params:
        if key in reserved:
            raise where.child("params", raw_params).error(key, "is set by batcher; remove it here")
    if (found := fastjson.unsendable(params)) is not None:
        field, problem = found
        raise where.child("params", raw_params).error(field, problem)
    _check_rules(providers[provider], kind, models, raw_params, where)
    system = data.get("system")
    if system is not None and (kind != "chat" or not isinstance(system, str)):
        raise where.error("system", "only a chat job takes a system message (a string)")
    max_bytes = providers[provider].max_input_bytes
    images = _parse_images(data["images"], where, base_dir, max_bytes) if "images" in data else ()
    if images and kind != "image":
        raise where.error("images", "only image jobs take input images")
    outputs = None
    if "outputs" in data and kind == "image":
        outputs = _parse_outputs(data["outputs"], where)
    elif "outputs" in data and "outputs" not in getattr(data, "inherited", ()):
        raise where.error("outputs", "only image jobs take outputs")
    vars_file = _parse_vars_file(data["vars_file"], where, base_dir) if "vars_file" in data \
        else None
    var_names = {name for name, _ in job_vars}
    for key, texts in (("prompts" if "prompts" in data else "prompt", prompts),
                       ("system", (system,) if system else ()), ("images", images)):
        for text in texts:
            try:
                missing = placeholders(text) - var_names
            except ValueError as exc:
                raise where.error(key, str(exc)) from None
            if missing and vars_file is None:
                raise where.error(
                    key, f"{{{sorted(missing)[0]}}} has no var of that name "
                    "(add it under vars or as a column of a vars_file, or write {{ and }} "
                    "for literal braces)",
                )
    job = JobSpec(
        name=name, type=kind, provider=provider, line=where.line(), models=models,
        prompts=prompts, vars=job_vars, seeds=seeds, images=images, params=params,
        system=system, vars_file=vars_file, outputs=outputs,
    )
    _check_combinations(job, where, base_dir, max_bytes)
    return job


def _check_combinations(job: JobSpec, where: _Where, base_dir: Path, max_bytes: int) -> None:
    """Stream the vars_file once (every row fills every template) and check each input image
    a template makes."""
    from batcher.varsfile import Row, check_rows

    var_names = frozenset(name for name, _ in job.vars)
    image_names = set().union(*(placeholders(i) for i in job.images))
    templated = [(index, entry) for index, entry in enumerate(job.images) if placeholders(entry)]
    image_vars = [(n, values) for n, values in job.vars if n in image_names]

    def check_row(row: Row) -> None:
        for combo in itertools.product(*(values for _, values in image_vars)):
            filled = {**row.values, **dict(zip((n for n, _ in image_vars), combo, strict=True))}
            for index, entry in templated:
                try:
                    check_local(parse_ref(entry.format_map(filled)), base_dir, max_bytes)
                except ValueError as exc:
                    if job.vars_file is None:
                        raise where.error(f"images[{index}]", str(exc)) from None
                    raise ManifestError(str(exc), file=str(job.vars_file), line=row.line,
                                        field=where.field(f"images[{index}]")) from None

    if job.vars_file is None:
        if templated:
            check_row(Row(0, {}))
        return
    system = placeholders(job.system or "")
    uses = {frozenset((placeholders(p) | system | image_names) - var_names) for p in job.prompts}
    check_rows(job.vars_file, [u for u in uses if u], var_names,
               check_row if templated else None)


def _check_rules(config: ProviderConfig, kind: str, models: tuple[str, ...],
                 params: Mapping[str, Any], where: _Where) -> None:
    """Params against what the provider documents (providers/rules.py): a value it would
    refuse is an error; a parameter it does not document, a warning (sent as written)."""
    for problem in check_params(config, kind, models, params):
        error = where.child("params", params).error(problem.field, problem.message)
        if problem.error:
            raise error
        log.warning("warning: %s", error)


def _parse_file_job(
    data: Mapping[str, Any], where: _Where, base_dir: Path, name: str, provider: str
) -> JobSpec:
    for key in data:
        if key not in FILE_JOB_FIELDS:
            raise where.error(key, "a job with a file takes its tasks from the file; remove this")
    ref = data["file"]
    if not isinstance(ref, str) or not ref:
        raise where.error("file", "must be the path of a JSONL file")
    path = (base_dir / ref).expanduser()
    if not path.is_file():
        raise where.error("file", f"{ref}: no such file (paths are relative to the manifest)")
    outputs = _parse_outputs(data["outputs"], where) if "outputs" in data else None
    return JobSpec(name=name, type="file", provider=provider, line=where.line(), file=path,
                   outputs=outputs)


# --------------------------------------------------------------------------- manifests


def load_manifest(path: str | Path, *, provider: str | None = None) -> Manifest:
    """Load and validate a YAML manifest or a JSONL task file (by its ``.jsonl`` suffix).

    ``provider`` names the provider for a bare JSONL file (default ``vultr``).
    Raises :class:`ManifestError` on anything that would stop the run.
    """
    path = Path(path)
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return _load_jsonl_manifest(path, provider or DEFAULT_JSONL_PROVIDER)
    if provider is not None:
        raise ManifestError("--provider is only for JSONL task files", file=str(path))
    data = _load_yaml(path)
    where = _Where(str(path), data if isinstance(data, Mapping) else None)
    if not isinstance(data, Mapping):
        raise ManifestError("a manifest must be a YAML mapping with name and jobs", file=str(path))
    _check_fields(data, TOP_FIELDS, where)
    name = _name(data.get("name"), where, "name")
    output = data.get("output", f"output/{name}")
    if not isinstance(output, str) or not output:
        raise where.error("output", "must be a folder path or a store URL (s3://, gs://, az://)")
    try:
        parse_store_url(output)
    except UsageError as exc:
        raise where.error("output", str(exc)) from None
    providers = _parse_providers(data.get("providers", {}), where)
    budget = _parse_budget(data.get("budget"), where)
    defaults = _require_mapping(data.get("defaults", {}), where, "defaults")
    _check_fields(defaults, JOB_FIELDS - {"name"}, where.child("defaults", defaults))
    jobs_data = data.get("jobs")
    if not isinstance(jobs_data, list) or not jobs_data:
        raise where.error("jobs", "required: a non-empty list of jobs")
    defaults_where = where.child("defaults", defaults)
    jobs: list[JobSpec] = []
    for index, job_data in enumerate(jobs_data):
        job_where = _Where(str(path), where.mapping, f"jobs[{index}].")
        if not isinstance(job_data, Mapping):
            raise job_where.error(None, "each job must be a mapping")
        job_where.mapping = _with_defaults(job_data, defaults, defaults_where)
        job = _parse_job(job_where.mapping, job_where, path.parent, providers)
        if any(job.name == other.name for other in jobs):
            raise job_where.error("name", f"{job.name!r} is used by another job")
        jobs.append(job)
    manifest = Manifest(name, path, output, providers, tuple(jobs), budget)
    for job in manifest.jobs:
        if job.file is not None:
            check_jsonl(job.file, max_input_bytes=providers[job.provider].max_input_bytes,
                        provider=providers[job.provider])
    return manifest


def _with_defaults(
    job: Mapping[str, Any], defaults: Mapping[str, Any], defaults_where: _Where
) -> _Mapping:
    """The job's fields over the defaults, each remembering the line it came from.

    A job of listed tasks (``file``) takes only ``provider`` and ``outputs`` from the defaults:
    the grid fields describe prompts it does not have.
    """
    usable = {"provider", "outputs"} if "file" in job else set(defaults)
    merged = _Mapping({k: v for k, v in defaults.items() if k in usable})
    merged.update(job)
    merged.line = getattr(job, "line", None)
    merged.lines = {k: defaults_where.line(k) or 0 for k in merged if k not in job}
    merged.lines.update(getattr(job, "lines", {}))
    merged.inherited = frozenset(k for k in merged if k not in job)
    return merged


def _parse_providers(value: Any, where: _Where) -> dict[str, ProviderConfig]:
    providers = dict(builtin_providers())
    data = _require_mapping(value, where, "providers")
    sub = where.child("providers", data)
    for name, fields in data.items():
        _name(name, sub, name)
        fields_where = sub.child(name, fields)
        _require_mapping(fields, sub, name)
        if "prices" in fields:
            fields = {**fields, "prices": _parse_prices(fields["prices"], fields_where)}
        try:
            providers[name] = provider_from_mapping(name, fields, providers.get(name))
        except ValueError as exc:
            key, _, message = str(exc).partition(": ")
            raise fields_where.error(key, message) from None
    return providers


def _parse_prices(value: Any, where: _Where) -> PriceList:
    data = _require_mapping(value, where, "prices")
    sub = where.child("prices", data)
    models = []
    for model, fields in data.items():
        if not isinstance(model, str) or not model.strip():
            raise sub.error(None, f"a model name must be a non-empty string ({ANY_MODEL!r} for "
                                  "the provider's other models)")
        if not isinstance(fields, Mapping) or not fields:
            raise sub.error(model, "must be a mapping of " + ", ".join(
                f"{name} ({meaning})" for name, meaning in PRICE_FIELDS.items()))
        try:
            models.append((model, price_from_mapping(fields)))
        except ValueError as exc:
            key, _, message = str(exc).partition(": ")
            raise sub.child(model, fields).error(key, message) from None
    return PriceList(tuple(models))


def _parse_budget(value: Any, where: _Where) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or value == float("inf"):
        raise where.error("budget", f"must be an amount in USD above 0, not {value!r}")
    return float(value)


def _load_jsonl_manifest(path: Path, provider: str) -> Manifest:
    providers = builtin_providers()
    if provider not in providers:
        known = ", ".join(sorted(providers))
        raise ManifestError(f"unknown provider {provider!r} (known: {known})", file=str(path),
                            field="--provider")
    if not path.is_file():
        raise ManifestError("no such file", file=str(path))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip(".-") or "tasks"
    job = JobSpec(name=name, type="file", provider=provider, file=path)
    check_jsonl(path, max_input_bytes=providers[provider].max_input_bytes,
                provider=providers[provider])
    return Manifest(name, path, f"output/{name}", providers, (job,))
