"""Asset names: a job's ``asset:`` template, filled in for each task.

A name is a relative path of segments of letters, digits, ``.``, ``_`` and ``-`` joined by
``/``: never absolute, never ``.`` or ``..``, so a published file cannot leave its target. The
template may use the job's vars, its vars_file's columns, ``{model}``, ``{seed}`` and ``{job}``.
Names are checked when the manifest loads: a bad one is a manifest error at its row, and two
jobs giving one name is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from batcher.manifest.fields import Where, placeholders

if TYPE_CHECKING:
    from batcher.manifest import JobSpec

SPECIAL = frozenset({"model", "seed", "job"})
_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
MAX_NAME = 512
MAX_SEGMENT = 100  # a file name is <segment>@<size>.<ext>, and a temporary one longer still
LISTING = "assets.json"  # publish's own file at the top of the set


def check_template(value: Any, where: Where, var_names: set[str], prompts: tuple[str, ...],
                   system: str | None, has_vars_file: bool, has_seeds: bool) -> str:
    """The ``asset:`` of a grid job, checked as a template (names are checked per task)."""
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


def check_keep(data: Mapping[str, Any], where: Where, asset: str | None,
               seeds: tuple[int, ...] | None) -> tuple[int | None, int | None]:
    """A job's ``keep`` and ``max_seeds``, checked."""
    keep = data.get("keep")
    if keep is None:
        if "max_seeds" in data:
            raise where.error("max_seeds", "goes with keep")
        return None, None
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise where.error("keep", f"must be a whole number from 1, not {keep!r}")
    if asset is None:
        raise where.error("keep", "counts the variants of each asset: give the job an asset")
    if "seed" in placeholders(asset):
        raise where.error("keep", "a name with {seed} makes each seed its own asset; "
                          "take {seed} out of asset")
    if seeds is None:
        raise where.error("keep", "varies the seed: give the job seeds")
    most = data.get("max_seeds", max(4 * keep, len(seeds)))
    if isinstance(most, bool) or not isinstance(most, int) or most < len(seeds):
        raise where.error("max_seeds", f"must be a whole number, at least the {len(seeds)} "
                          f"seeds listed, not {most!r}")
    return keep, most
