"""A whole manifest: a YAML file of providers, defaults and jobs, or a JSONL task file taken
as a manifest of one job."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batcher.errors import ManifestError, UsageError
from batcher.location import parse_store_url
from batcher.manifest.fields import (
    Where,
    check_fields,
    checked_name,
    require_mapping,
)
from batcher.manifest.jobs import JOB_FIELDS, JobSpec, Manifest, parse_job
from batcher.manifest.jsonl import UserIds, check_jsonl
from batcher.manifest.named import check_names
from batcher.manifest.tasks import computed_tasks
from batcher.manifest.yamllines import LinedMapping, load_yaml
from batcher.providers.config import ProviderConfig, builtin_providers, provider_from_mapping
from batcher.providers.prices import ANY_MODEL, PRICE_FIELDS, PriceList, price_from_mapping

DEFAULT_JSONL_PROVIDER = "vultr"
TOP_FIELDS = {"name", "output", "providers", "defaults", "jobs", "budget"}


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
    data = load_yaml(path)
    where = Where(str(path), data if isinstance(data, Mapping) else None)
    if not isinstance(data, Mapping):
        raise ManifestError("a manifest must be a YAML mapping with name and jobs", file=str(path))
    check_fields(data, TOP_FIELDS, where)
    name = checked_name(data.get("name"), where, "name")
    output = data.get("output", f"output/{name}")
    if not isinstance(output, str) or not output:
        raise where.error("output", "must be a folder path or a store URL (s3://, gs://, az://)")
    try:
        parse_store_url(output)
    except UsageError as exc:
        raise where.error("output", str(exc)) from None
    providers = _parse_providers(data.get("providers", {}), where)
    budget = _parse_budget(data.get("budget"), where)
    defaults = require_mapping(data.get("defaults", {}), where, "defaults")
    check_fields(defaults, JOB_FIELDS - {"name"}, where.child("defaults", defaults))
    jobs_data = data.get("jobs")
    if not isinstance(jobs_data, list) or not jobs_data:
        raise where.error("jobs", "required: a non-empty list of jobs")
    defaults_where = where.child("defaults", defaults)
    jobs: list[JobSpec] = []
    for index, job_data in enumerate(jobs_data):
        job_where = Where(str(path), where.mapping, f"jobs[{index}].")
        if not isinstance(job_data, Mapping):
            raise job_where.error(None, "each job must be a mapping")
        job_where.mapping = _with_defaults(job_data, defaults, defaults_where)
        job = parse_job(job_where.mapping, job_where, path.parent, providers)
        if any(job.name == other.name for other in jobs):
            raise job_where.error("name", f"{job.name!r} is used by another job")
        jobs.append(job)
    manifest = Manifest(name, path, output, providers, tuple(jobs), budget)
    ids = UserIds()  # an id names one task across every file of the manifest
    for job in manifest.jobs:
        if job.file is not None:
            check_jsonl(job.file, max_input_bytes=providers[job.provider].max_input_bytes,
                        provider=providers[job.provider], ids=ids, job=job.name)
    check_names(manifest)
    _check_computed_ids(manifest, ids)
    return manifest


def _check_computed_ids(manifest: Manifest, ids: UserIds) -> None:
    """A user id may not be the id batcher computes for another task of the manifest (a
    custom_id copied from results.jsonl into a retry file): the two tasks would be one ledger
    row, both paid, one kept. Only a user id of a computed id's form can be one, so the
    manifest's computed ids are walked (streamed, against the ids' digests) only when the task
    files have such an id."""
    if not ids.hashlike:
        return
    for task in computed_tasks(manifest, ids.with_computed):
        found = ids.find_computed(task.id)
        if found is not None:
            path, line = found
            raise ManifestError(
                f"{task.id!r} is the id batcher computes for a task of job {task.job} "
                f"({task.prompt[:60]!r}, {task.model}); a user id names one task: give this "
                "line an id of its own", file=str(path), line=line.line, field=line.id_field)


def _with_defaults(
    job: Mapping[str, Any], defaults: Mapping[str, Any], defaults_where: Where
) -> LinedMapping:
    """The job's fields over the defaults, each remembering the line it came from.

    A job of listed tasks (``file``) takes only ``provider`` and ``outputs`` from the defaults:
    the grid fields describe prompts it does not have.
    """
    usable = {"provider", "outputs"} if "file" in job else set(defaults)
    merged = LinedMapping({k: v for k, v in defaults.items() if k in usable})
    merged.update(job)
    merged.line = getattr(job, "line", None)
    merged.lines = {k: defaults_where.line(k) or 0 for k in merged if k not in job}
    merged.lines.update(getattr(job, "lines", {}))
    merged.inherited = frozenset(k for k in merged if k not in job)
    return merged


def _parse_providers(value: Any, where: Where) -> dict[str, ProviderConfig]:
    providers = dict(builtin_providers())
    data = require_mapping(value, where, "providers")
    sub = where.child("providers", data)
    for name, fields in data.items():
        checked_name(name, sub, name)
        fields_where = sub.child(name, fields)
        require_mapping(fields, sub, name)
        if "prices" in fields:
            fields = {**fields, "prices": _parse_prices(fields["prices"], fields_where)}
        try:
            providers[name] = provider_from_mapping(name, fields, providers.get(name))
        except ValueError as exc:
            key, _, message = str(exc).partition(": ")
            raise fields_where.error(key, message) from None
    return providers


def _parse_prices(value: Any, where: Where) -> PriceList:
    data = require_mapping(value, where, "prices")
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


def _parse_budget(value: Any, where: Where) -> float | None:
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
    ids = UserIds()
    check_jsonl(path, max_input_bytes=providers[provider].max_input_bytes,
                provider=providers[provider], ids=ids)
    manifest = Manifest(name, path, f"output/{name}", providers, (job,))
    _check_computed_ids(manifest, ids)
    return manifest
