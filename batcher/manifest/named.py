"""The asset name of each task, and the manifest-wide check of names: every name valid, no
name given by two jobs, no two variants of one name alike. The rules of one name are in
:mod:`batcher.manifest.assets`."""

from __future__ import annotations

from collections.abc import Iterator

from batcher.errors import ManifestError
from batcher.manifest.assets import columns_of, fill, folder_clash
from batcher.manifest.jobs import JobSpec, Manifest
from batcher.manifest.tasks import Task, expand
from batcher.manifest.varsfile import iter_rows


def task_asset(job: JobSpec, task: Task) -> str:
    """The asset name of one of the job's tasks (its template checked when it loaded)."""
    assert job.asset is not None
    return fill(job.asset, dict(task.vars), task.model, task.seed, job.name)


def named_tasks(manifest: Manifest) -> Iterator[tuple[str, JobSpec, Task]]:
    """Each task of a job with ``asset:``, with its name, in expansion order."""
    jobs = {job.name: job for job in manifest.jobs if job.asset is not None}
    for task in expand(manifest):
        job = jobs.get(task.job)
        if job is not None:
            yield task_asset(job, task), job, task


def check_names(manifest: Manifest) -> None:
    """Every name of the manifest valid, and no name given by two jobs."""
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
        values = dict(task.vars)
        for row in iter_rows(job.vars_file):
            if all(row.values.get(c) == values.get(c) for c in columns):
                return ManifestError(message, file=str(job.vars_file), line=row.line,
                                     field=min(columns))
    return ManifestError(message, file=str(manifest.path), line=job.asset_line or job.line,
                         field=field)
