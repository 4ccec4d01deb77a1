"""One job of a manifest: its fields checked (prompts, vars, vars_file, seeds, images, params,
outputs) into a :class:`JobSpec`, a prompt grid or a JSONL ``file`` of tasks; and the
:class:`Manifest` the jobs make up (read by :func:`batcher.manifest.load.load_manifest`)."""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batcher import fastjson
from batcher.errors import ManifestError
from batcher.imagerefs import FILE, check_local, digest, parse_ref
from batcher.manifest.assets import check_keep, check_template
from batcher.manifest.fields import (
    Where,
    check_fields,
    checked_name,
    placeholders,
    require_mapping,
    string_list,
)
from batcher.manifest.jsonl import JOB_TYPES, RESERVED_PARAMS
from batcher.outputs import AS_DELIVERED, DEFAULT_MAX_PIXELS, FORMATS, Outputs
from batcher.providers.config import ProviderConfig
from batcher.providers.rules import check_params

log = logging.getLogger(__name__)
JOB_FIELDS = {
    "name", "type", "provider", "model", "models", "prompt", "prompts", "vars", "seeds",
    "images", "params", "system", "file", "vars_file", "outputs", "asset", "keep", "max_seeds",
}
FILE_JOB_FIELDS = {"name", "file", "provider", "type", "outputs"}
OUTPUT_FIELDS = {"format", "quality", "sizes", "metadata", "max_pixels"}
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
    vars_file: Path | None = None  # rows of placeholders (batcher.manifest.varsfile)
    outputs: Outputs | None = None  # files derived from each delivered image
    # Asset sets (batcher.publish): the name template, its line, how many ok unrejected
    # variants each asset keeps, the most seeds it may take, and the seeds each asset has
    # beyond ``seeds`` (filled in before a run from the ledger and the picks).
    asset: str | None = None
    asset_line: int | None = None
    keep: int | None = None
    max_seeds: int | None = None
    more_seeds: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def _parse_vars(value: Any, where: Where) -> tuple[tuple[str, tuple[str, ...]], ...]:
    data = require_mapping(value, where, "vars")
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


def _parse_seeds(value: Any, where: Where) -> tuple[int, ...]:
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


def _parse_images(value: Any, where: Where, base_dir: Path, max_bytes: int) -> tuple[str, ...]:
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


def _parse_outputs(value: Any, where: Where) -> Outputs:
    data = require_mapping(value, where, "outputs")
    sub = where.child("outputs", data)
    check_fields(data, OUTPUT_FIELDS, sub)
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
    sizes_data = require_mapping(data.get("sizes", {}), sub, "sizes")
    sizes_where = sub.child("sizes", sizes_data)
    sizes = []
    for name, side in sizes_data.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name):
            raise sizes_where.error(name, "a size's name goes into file names: a-z, 0-9, _ "
                                    "and - only, at most 32 characters")
        if name == "full":  # <stem>@full.<ext> is the full-size copy's name
            raise sizes_where.error(name, "'full' names the full-size copy; call the size "
                                    "something else")
        if isinstance(side, bool) or not isinstance(side, int) or not 1 <= side <= MAX_SIDE:
            raise sizes_where.error(name, f"the longest side in px, a whole number from 1 to "
                                    f"{MAX_SIDE}, not {side!r}")
        sizes.append((name, side))
    metadata = data.get("metadata", False)
    if not isinstance(metadata, bool):
        raise sub.error("metadata", f"must be true or false, not {metadata!r}")
    max_pixels = data.get("max_pixels", DEFAULT_MAX_PIXELS)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise sub.error("max_pixels", "the most pixels (width x height) an image may have to "
                        f"be decoded for derived files, a whole number above 0, not {max_pixels!r}")
    if fmt is None and quality is not None and not sizes:
        raise sub.error("quality", "applies to a format or sizes; set format or sizes too")
    if fmt is None and metadata and not sizes:
        raise sub.error("metadata", "goes into derived files, and the image as delivered is "
                        "never rewritten: set format or sizes too")
    return Outputs(fmt, quality, tuple(sizes), metadata, max_pixels)


def _parse_vars_file(value: Any, where: Where, base_dir: Path) -> Path:
    from batcher.manifest.varsfile import SUFFIXES

    if not isinstance(value, str) or not value:
        raise where.error("vars_file", "must be the path of a CSV, JSONL or YAML file")
    path = (base_dir / value).expanduser()
    if path.suffix.lower() not in SUFFIXES:
        raise where.error("vars_file", f"{value}: must end in {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise where.error("vars_file", f"{value}: no such file (paths are relative to the "
                          "manifest)")
    return path


def parse_job(
    data: Mapping[str, Any], where: Where, base_dir: Path, providers: Mapping[str, Any]
) -> JobSpec:
    check_fields(data, JOB_FIELDS, where)
    name = checked_name(data.get("name"), where, "name")
    provider = data.get("provider")
    if not isinstance(provider, str) or provider not in providers:
        known = ", ".join(sorted(providers))
        raise where.error("provider", f"unknown provider {provider!r} (known: {known})")
    if "file" in data:
        return parse_file_job(data, where, base_dir, name, provider)
    kind = data.get("type")
    if kind not in JOB_TYPES:
        raise where.error("type", f"must be image or chat, not {kind!r}")
    models = string_list(data, "model", "models", where)
    prompts = string_list(data, "prompt", "prompts", where)
    job_vars = _parse_vars(data["vars"], where) if "vars" in data else ()
    seeds = _parse_seeds(data["seeds"], where) if "seeds" in data else None
    raw_params = require_mapping(data.get("params", {}), where, "params")
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
    _check_placeholders(data, where, var_names, vars_file is not None,
                        prompts=prompts, system=system, images=images)
    asset, keep, max_seeds = _parse_asset(data, where, var_names, prompts, system,
                                          vars_file is not None, seeds)
    job = JobSpec(
        name=name, type=kind, provider=provider, line=where.line(), models=models,
        prompts=prompts, vars=job_vars, seeds=seeds, images=images, params=params,
        system=system, vars_file=vars_file, outputs=outputs, asset=asset,
        asset_line=where.line("asset") if asset else None, keep=keep, max_seeds=max_seeds,
    )
    _check_combinations(job, where, base_dir, max_bytes)
    return job


def _check_placeholders(
    data: Mapping[str, Any], where: Where, var_names: set[str], has_vars_file: bool, *,
    prompts: tuple[str, ...], system: str | None, images: tuple[str, ...],
) -> None:
    """Each ``{name}`` in the prompts, the system message and the input images is well formed
    and names a var; with a vars_file it may name a column instead (checked per row later)."""
    for key, texts in (("prompts" if "prompts" in data else "prompt", prompts),
                       ("system", (system,) if system else ()), ("images", images)):
        for text in texts:
            try:
                missing = placeholders(text) - var_names
            except ValueError as exc:
                raise where.error(key, str(exc)) from None
            if missing and not has_vars_file:
                raise where.error(
                    key, f"{{{sorted(missing)[0]}}} has no var of that name "
                    "(add it under vars or as a column of a vars_file, or write {{ and }} "
                    "for literal braces)",
                )


def _parse_asset(
    data: Mapping[str, Any], where: Where, var_names: set[str], prompts: tuple[str, ...],
    system: str | None, has_vars_file: bool, seeds: tuple[int, ...] | None,
) -> tuple[str | None, int | None, int | None]:
    """``asset``, ``keep`` and ``max_seeds`` (batcher.manifest.assets, batcher.publish.keep)."""
    asset = None
    if "asset" in data:
        asset = check_template(data["asset"], where, var_names, prompts, system,
                               has_vars_file, seeds is not None)
    keep, max_seeds = check_keep(data, where, asset, seeds)
    return asset, keep, max_seeds


def _check_combinations(job: JobSpec, where: Where, base_dir: Path, max_bytes: int) -> None:
    """Stream the vars_file once (every row fills every template) and check each input image
    a template makes."""
    from batcher.manifest.varsfile import Row, check_rows

    var_names = frozenset(name for name, _ in job.vars)
    image_names = set().union(*(placeholders(i) for i in job.images))
    templated = [(index, entry) for index, entry in enumerate(job.images) if placeholders(entry)]
    image_vars = [(n, values) for n, values in job.vars if n in image_names]

    def check_row(row: Row) -> bytes:
        """Check the row's input images; returns what a task id knows of them (their
        content: two rows naming files of the same bytes make the same tasks)."""
        known = hashlib.sha256()
        for combo in itertools.product(*(values for _, values in image_vars)):
            filled = {**row.values, **dict(zip((n for n, _ in image_vars), combo, strict=True))}
            for index, entry in templated:
                try:
                    ref = parse_ref(entry.format_map(filled))
                    check_local(ref, base_dir, max_bytes)
                    data = ref.path(base_dir).read_bytes() if ref.kind == FILE else None
                except (ValueError, OSError) as exc:
                    message = str(exc) if isinstance(exc, ValueError) else \
                        f"cannot read the image: {exc.strerror}"
                    if job.vars_file is None:
                        raise where.error(f"images[{index}]", message) from None
                    raise ManifestError(message, file=str(job.vars_file), line=row.line,
                                        field=where.field(f"images[{index}]")) from None
                known.update(digest(ref, data).encode() + b"\n")
        return known.digest()

    if job.vars_file is None:
        if templated:
            check_row(Row(0, {}))
        return
    system = placeholders(job.system or "")
    uses = {frozenset((placeholders(p) | system | image_names) - var_names) for p in job.prompts}
    in_text = set().union(system, *(placeholders(p) for p in job.prompts))
    check_rows(job.vars_file, [u for u in uses if u], var_names,
               check_row if templated else None,
               image_only=frozenset(image_names - in_text) if templated else frozenset())


def _check_rules(config: ProviderConfig, kind: str, models: tuple[str, ...],
                 params: Mapping[str, Any], where: Where) -> None:
    """Params against what the provider documents (providers/rules.py): a value it would
    refuse is an error; a parameter it does not document, a warning (sent as written)."""
    for problem in check_params(config, kind, models, params):
        error = where.child("params", params).error(problem.field, problem.message)
        if problem.error:
            raise error
        log.warning("warning: %s", error)


def parse_file_job(
    data: Mapping[str, Any], where: Where, base_dir: Path, name: str, provider: str
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
