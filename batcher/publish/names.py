"""Asset names: a job's ``asset:`` template, filled in for each task.

A name is a relative path of segments of letters, digits, ``.``, ``_`` and ``-`` joined by
``/``: never absolute, never ``.`` or ``..``, so a published file cannot leave its target. The
template may use the job's vars, its vars_file's columns, ``{model}``, ``{seed}`` and ``{job}``.
Names are checked when the manifest loads: a bad one is a manifest error at its row, and two
jobs giving one name is an error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from batcher.errors import ManifestError

if TYPE_CHECKING:
    from batcher.manifest import JobSpec, Manifest
    from batcher.manifest.fields import Where
    from batcher.manifest.tasks import Task

SPECIAL = frozenset({"model", "seed", "job"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MAX_NAME = 512
MAX_SEGMENT = 100  # a file name is <segment>@<size>.<ext>, and a temporary one longer still
LISTING = "assets.json"  # publish's own file at the top of the set


def check_template(value: Any, where: Where, var_names: set[str], prompts: tuple[str, ...],
                   system: str | None, has_vars_file: bool, has_seeds: bool) -> str:
    """The ``asset:`` of a grid job, checked as a template (names are checked per task)."""
    from batcher.manifest.fields import placeholders

    if not isinstance(value, str) or not value.strip():
        raise where.error("asset", "must be a name template such as \"icons/{sku}\"")
    try:
        used = placeholders(value)
    except ValueError as exc:
        raise where.error("asset", str(exc)) from None
    if "seed" in used and not has_seeds:
        raise where.error("asset", "{seed} needs seeds on the job")
    columns = used - SPECIAL - var_names
    if columns and not has_vars_file:
        raise where.error("asset", f"{{{min(columns)}}} has no var of that name (add it under "
                          "vars or as a column of a vars_file)")
    extra = placeholders(system or "")
    for prompt in prompts:
        shaping = placeholders(prompt) | extra
        unused = (used & var_names) - shaping
        if unused:
            raise where.error("asset", f"{{{min(unused)}}} does not change the prompt "
                              f"{prompt!r}: its tasks would be one picture under many names")
        if columns and not (shaping - var_names):
            raise where.error("asset", f"{{{min(columns)}}} comes from the vars_file, but the "
                              f"prompt {prompt!r} uses none of its columns: every row would "
                              "be one picture under many names")
    return value


def columns_of(job: JobSpec) -> frozenset[str]:
    """The vars_file columns a job's asset template reads."""
    from batcher.manifest.fields import placeholders

    if job.asset is None or job.vars_file is None:
        return frozenset()
    return frozenset(placeholders(job.asset) - SPECIAL - {name for name, _ in job.vars})


def fill(template: str, values: Mapping[str, str], model: str, seed: int | None,
         job: str) -> str:
    """The template filled in; raises ``ValueError`` when the result is not a valid name."""
    name = template.format_map({**values, "model": model, "job": job,
                                "seed": "" if seed is None else str(seed)})
    problem = name_problem(name)
    if problem:
        raise ValueError(f"{name!r} {problem}")
    return name


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid asset name, or ``None``."""
    if not name:
        return "is empty"
    if len(name) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    if name.startswith("/"):
        return "is absolute; a name is a relative path"
    segments = name.split("/")
    for segment in segments:
        if segment in {"", ".", ".."}:
            return "has an empty, '.' or '..' segment"
        if segment.startswith("."):
            return "has a segment starting with '.' (a hidden file or folder)"
        if not _SEGMENT.fullmatch(segment):
            return "may hold only letters, digits, '.', '_', '-' and '/'"
        if len(segment) > MAX_SEGMENT:
            return f"has a segment longer than {MAX_SEGMENT} characters"
    if segments[0].lower() == LISTING:
        return f"is under {LISTING!r}, the set's listing"
    return None


def folder_clash(name: str, names: set[str]) -> str | None:
    """A name of ``names`` whose files (``<other>.<ext>``, ``<other>@<size>.<ext>``) would be
    where ``name`` needs a folder, or ``None``."""
    segments = name.split("/")
    for depth in range(1, len(segments)):
        folder = "/".join(segments[:depth])
        for at, char in enumerate(folder):
            if char == "." and "/" not in folder[at:] and folder[:at] in names:
                return folder[:at]
    return None


def task_asset(job: JobSpec, task: Task) -> str:
    """The asset name of one of the job's tasks (its template checked when it loaded)."""
    assert job.asset is not None
    return fill(job.asset, dict(task.vars), task.model, task.seed, job.name)


def named_tasks(manifest: Manifest) -> Iterator[tuple[str, JobSpec, Task]]:
    """Each task of a job with ``asset:``, with its name, in expansion order."""
    from batcher.manifest.tasks import expand

    jobs = {job.name: job for job in manifest.jobs if job.asset is not None}
    for task in expand(manifest):
        job = jobs.get(task.job)
        if job is not None:
            yield task_asset(job, task), job, task


def check_names(manifest: Manifest) -> None:
    """Every name of the manifest valid, and no name given by two jobs."""
    from batcher.manifest.tasks import expand

    jobs = {job.name: job for job in manifest.jobs if job.asset is not None}
    if not jobs:
        return
    owner: dict[str, str] = {}
    variants: dict[tuple[str, str, int | None], Task] = {}
    named: list[tuple[str, JobSpec, Task]] = []
    for task in expand(manifest):
        job = jobs.get(task.job)
        if job is None:
            continue
        try:
            name = task_asset(job, task)
        except ValueError as exc:
            raise _at_row(manifest, job, task, f"the name {exc}") from None
        first = owner.setdefault(name, job.name)
        if first != job.name:
            raise _at_row(manifest, job, task, f"{name!r} is also a name of job {first!r}; "
                          "two jobs cannot give one name")
        twin = variants.setdefault((name, task.model, task.seed), task)
        if twin.id != task.id:
            raise _at_row(manifest, job, task, _twins(name, twin, task, job), exact=True)
        named.append((name, job, task))
    names = set(owner)
    for name, job, task in named:
        clash = folder_clash(name, names)
        if clash is not None:
            raise _at_row(manifest, job, task, f"{name!r} needs a folder where the name "
                          f"{clash!r} puts its file")


def _twins(name: str, first: Task, second: Task, job: JobSpec) -> str:
    """Two tasks of one name with the same model and seed: no pick or reject could tell
    their variants apart."""
    line = _row_line(job, first)
    also = f" (the other at row {line})" if line not in {None, _row_line(job, second)} else ""
    return (f"{name!r} is given to two tasks{also} with the same model and seed that differ "
            f"only in the prompt ({first.prompt!r} and {second.prompt!r}): no pick could tell "
            "them apart; put what tells them apart in asset:")


def _row_line(job: JobSpec, task: Task) -> int | None:
    """The line of the vars_file row the task came from (all its values alike)."""
    if job.vars_file is None:
        return None
    from batcher.manifest.varsfile import iter_rows

    values = dict(task.vars)
    for row in iter_rows(job.vars_file):
        if row.values and all(values.get(k) == v for k, v in row.values.items()
                              if k in values):
            return row.line
    return None


def _at_row(manifest: Manifest, job: JobSpec, task: Task, message: str, *,
            exact: bool = False) -> ManifestError:
    """The error at the vars_file row the task came from (``exact``: the row with all its
    values, else the first with its name's), else at the job's ``asset:``."""
    field = f"jobs[{manifest.jobs.index(job)}].asset"
    columns = columns_of(job)
    line = _row_line(job, task) if exact and columns else None
    if job.vars_file is not None and line is not None:
        return ManifestError(message, file=str(job.vars_file), line=line, field=min(columns))
    if job.vars_file is not None and columns:
        from batcher.manifest.varsfile import iter_rows

        values = dict(task.vars)
        for row in iter_rows(job.vars_file):
            if all(row.values.get(c) == values.get(c) for c in columns):
                return ManifestError(message, file=str(job.vars_file), line=row.line,
                                     field=min(columns))
    return ManifestError(message, file=str(manifest.path), line=job.asset_line or job.line,
                         field=field)
