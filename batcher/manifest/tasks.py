"""Task records, the streaming expansion of a manifest, and stable task ids.

A task's id is the user's ``id``/``custom_id`` where given, else a hash of its job and of
everything that shapes the result: provider, endpoint, params (less transport-only fields), the
sha256 of each input image, the prompt or messages, the model and the seed. The hash is built in
that order so that the expansion, whose innermost loops are models and seeds, extends a shared
prefix instead of hashing each task from scratch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import zlib
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batcher.errors import ManifestError
from batcher.imagerefs import FILE, digest, parse_ref
from batcher.manifest.assets import columns_of, fill
from batcher.manifest.fields import placeholders
from batcher.manifest.jobs import JobSpec, Manifest
from batcher.manifest.jsonl import TRANSPORT_FIELDS, JsonlTask, iter_jsonl

ENDPOINTS = {"image": "/images/generations", "chat": "/chat/completions"}
ID_LENGTH = 32


@dataclass(frozen=True, slots=True)
class Task:
    """One request to make: a prompt for one model and seed, within a job."""

    id: str
    job: str
    kind: str
    provider: str
    model: str
    prompt: str
    seed: int | None = None
    params: Mapping[str, Any] | None = None
    images: tuple[str, ...] = ()
    system: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    vars: tuple[tuple[str, str], ...] = ()
    base_dir: Path | None = None

    @property
    def endpoint(self) -> str:
        return ENDPOINTS[self.kind]

    def shard(self, count: int) -> int:
        """The shard (1..count) this task belongs to, stable across machines."""
        return shard_of(self.id, count)


def shard_of(task_id: str, count: int) -> int:
    """The shard (1..count) of a task id, stable across machines."""
    return zlib.crc32(task_id.encode()) % count + 1


# --------------------------------------------------------------------------- identity


def _feed(hasher: Any, tag: str, value: str) -> None:
    data = value.encode()
    hasher.update(f"{tag}:{len(data)}:".encode())
    hasher.update(data)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _base_hasher(
    job: str, provider: str, kind: str, params: Mapping[str, Any],
    image_digests: tuple[str, ...],
) -> Any:
    hasher = hashlib.sha256(b"batcher-task-v1\n")
    # The job is part of a task's identity: two jobs asking for the same picture are two
    # tasks with two files, each counted in its own job.
    _feed(hasher, "job", job)
    _feed(hasher, "provider", provider)
    _feed(hasher, "endpoint", ENDPOINTS[kind])
    shaping = {k: v for k, v in params.items() if k not in TRANSPORT_FIELDS}
    _feed(hasher, "params", _canonical(shaping))
    _feed(hasher, "images", ",".join(image_digests))
    return hasher


def _content_text(kind: str, prompt: str, system: str | None, messages: Any) -> str:
    if messages is not None:
        return "messages:" + _canonical(list(messages))
    if kind == "chat":
        return "messages:" + _canonical(chat_messages(prompt, system))
    return "prompt:" + prompt


def _with(hasher: Any, tag: str, value: str) -> Any:
    copy = hasher.copy()
    _feed(copy, tag, value)
    return copy


def _finish(hasher: Any, seed: int | None) -> str:
    _feed(hasher, "seed", "" if seed is None else str(seed))
    return hasher.hexdigest()[:ID_LENGTH]


def chat_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    """The messages of a chat task written as a prompt and an optional system message."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    return messages


class ImageDigests:
    """sha256 of input images, each local file read once per expansion (while the cache holds
    it: images filled in from a vars file's rows may be a million files)."""

    CACHE = 4096

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def of(self, refs: tuple[str, ...], base_dir: Path) -> tuple[str, ...]:
        return tuple(self._one(ref, base_dir) for ref in refs)

    def _one(self, text: str, base_dir: Path) -> str:
        ref = parse_ref(text)
        if ref.kind != FILE:
            return digest(ref)
        path = ref.path(base_dir)
        found = self._cache.get(path)
        if found is None:
            found = digest(ref, path.read_bytes())
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            self._cache[path] = found
        return found


# --------------------------------------------------------------------------- expansion


def expand(manifest: Manifest, *, only: str | None = None) -> Iterator[Task]:
    """Every task of the manifest, in the stable order prompts x vars x models x seeds.

    A generator: a manifest of a million tasks never has them all in memory.
    """
    digests = ImageDigests()
    for job in manifest.jobs:
        if only is not None and job.name != only:
            continue
        if job.file is not None:
            yield from _expand_file(job, digests)
        else:
            yield from _expand_grid(job, manifest.base_dir, digests)


def _expand_grid(job: JobSpec, base_dir: Path, digests: ImageDigests) -> Iterator[Task]:
    image_names = set().union(*(placeholders(entry) for entry in job.images))
    fixed = None if image_names else _base_hasher(
        job.name, job.provider, job.type, job.params, digests.of(job.images, base_dir))
    var_names = {name for name, _ in job.vars}
    seeds: tuple[int | None, ...] = job.seeds if job.seeds is not None else (None,)
    for template in job.prompts:
        # A prompt repeats only over the vars it (or the system message, or an input image)
        # uses: "a logo" beside "a {city} poster" is one task, not one per city.
        used = placeholders(template) | placeholders(job.system or "") | image_names
        grid = [(name, values) for name, values in job.vars if name in used]
        names = [name for name, _ in grid]
        from_rows = used - var_names
        if from_rows:  # the asset's name may read columns the prompt does not
            from_rows |= columns_of(job)
        for row in _rows(job, from_rows):
            # product() is lazy, and so are the rows: a million combinations are walked,
            # never stored.
            for combo in itertools.product(*(values for _, values in grid)):
                filled = {**row, **dict(zip(names, combo, strict=True))}
                images = job.images
                base = fixed
                if base is None:
                    images = tuple(entry.format_map(filled) for entry in job.images)
                    base = _base_hasher(job.name, job.provider, job.type, job.params,
                                        digests.of(images, base_dir))
                yield from _grid_cell(job, base, template, filled, seeds, base_dir, images)


def _rows(job: JobSpec, names: set[str]) -> Iterator[dict[str, str]]:
    """The values of ``names`` in each row of the job's vars_file, read as consumed; one empty
    row when the job has none, or the prompt takes nothing from it."""
    if job.vars_file is None or not names:
        yield {}
        return
    from batcher.manifest.varsfile import iter_rows

    for row in iter_rows(job.vars_file):
        missing = names - row.values.keys()
        if missing:  # validation read the file; it changed since
            raise ManifestError(f"no value for {{{min(missing)}}}", file=str(job.vars_file),
                                line=row.line, field=min(missing))
        yield {name: row.values[name] for name in row.values if name in names}


def _grid_cell(
    job: JobSpec,
    base: Any,
    template: str,
    filled: dict[str, str],
    seeds: tuple[int | None, ...],
    base_dir: Path,
    images: tuple[str, ...],
) -> Iterator[Task]:
    """The tasks of one filled-in prompt: every model, every seed."""
    prompt = template.format_map(filled)
    system = job.system.format_map(filled) if job.system else None
    params = job.params
    with_prompt = _with(base, "content", _content_text(job.type, prompt, system, None))
    pairs = tuple(filled.items())
    for model in job.models:
        with_model = _with(with_prompt, "model", model)
        if job.more_seeds:  # keep: N gave some assets more seeds (batcher.publish.keep)
            assert job.asset is not None
            name = fill(job.asset, filled, model, None, job.name)
            seeds = job.more_seeds.get(name, job.seeds or (None,))
        for seed in seeds:
            yield Task(
                id=_finish(with_model.copy(), seed), job=job.name, kind=job.type,
                provider=job.provider, model=model, prompt=prompt, seed=seed, params=params,
                images=images, system=system, vars=pairs, base_dir=base_dir,
            )


def computed_tasks(manifest: Manifest, files: Collection[tuple[str | None, Path]]
                   ) -> Iterator[Task]:
    """The tasks of ``manifest`` whose id batcher computes: every task of a grid job, and the
    lines without an id of the task files in ``files`` (job name, file) (the others have
    none)."""
    digests = ImageDigests()
    for job in manifest.jobs:
        if job.file is None:
            yield from _expand_grid(job, manifest.base_dir, digests)
        elif (job.name, job.file) in files or (None, job.file) in files:
            yield from (_file_task(job, line, digests) for line in iter_jsonl(job.file)
                        if line.id is None)


def _expand_file(job: JobSpec, digests: ImageDigests) -> Iterator[Task]:
    assert job.file is not None
    for line in iter_jsonl(job.file):
        yield _file_task(job, line, digests)


def _file_task(job: JobSpec, line: JsonlTask, digests: ImageDigests) -> Task:
    assert job.file is not None
    base_dir = job.file.parent
    task_id = line.id
    if task_id is None:
        hasher = _base_hasher(job.name, job.provider, line.type, line.params,
                              digests.of(line.images, base_dir))
        content = _content_text(line.type, line.prompt, line.system, line.messages)
        hasher = _with(_with(hasher, "content", content), "model", line.model)
        task_id = _finish(hasher, line.seed)
    return Task(
        id=task_id, job=job.name, kind=line.type, provider=job.provider, model=line.model,
        prompt=line.prompt, seed=line.seed, params=line.params, images=line.images,
        system=line.system, messages=line.messages, base_dir=base_dir,
    )
