"""The output's names: slugs, short ids, a task's files, and the files batcher keeps of its own.

File names are built only from sanitised slugs and hashes, so no prompt, model name or task id
can place a file outside the output folder. Files are written by :mod:`batcher.store.atomic`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from batcher.manifest.tasks import Task

LOCK_NAME = ".batcher.lock"  # a folder's lock, and the unsharded run's lock in a store
SUMMARY_NAME = "summary.json"
RESULTS_NAME = "results.jsonl"
INDEX_NAME = "index.html"
JOURNAL_NAME = ".batcher-prune.json"  # what an unfinished prune still has to remove
LEDGERS = "ledgers/"  # a store's shards' ledgers, locks and summaries
SLUG_MAX = 48
# Names Windows refuses for a file or folder whatever the extension (checked on the stem).
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(10)}
_NOT_SLUG = re.compile(r"[^a-z0-9]+")


@functools.lru_cache(maxsize=4096)  # job and model names, and prompts shared by many seeds
def slugify(text: str, max_length: int = SLUG_MAX) -> str:
    """A lowercase ASCII slug of ``text``: ``a-z``, ``0-9`` and single dashes, never empty.

    Bounded and deterministic; a reserved device name gets a trailing underscore.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    slug = _NOT_SLUG.sub("-", ascii_text.lower()).strip("-")[:max_length].rstrip("-")
    if not slug:
        slug = "x" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if slug in _RESERVED:
        slug += "_"
    return slug


ID_CHARS = 16  # hex characters of a task id's hash in its file names (64 bits)
LEGACY_ID_CHARS = 8  # what batcher wrote before: outputs made then keep their names


def short_id(task_id: str, length: int = ID_CHARS) -> str:
    """Hex characters that stand for a task id in file names.

    Always a hash of the id, even of an id that is a hash already: a user's id may look like
    one of batcher's and share its first characters with another. Sixteen characters (64
    bits): names meet only when two tasks share the job, the model, the seed, the first 48
    characters of the prompt's slug *and* this hash; among a million such tasks the chance
    that any two do is about 3 in 100 million (eight characters made it 116 expected pairs).
    The ledger refuses the rare one left (:meth:`batcher.store.ledger.Ledger.claim`).
    """
    return hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:length]


class Named(Protocol):
    """What a task's file names are made of: a Task, or the Record of one."""

    @property
    def id(self) -> str: ...
    @property
    def job(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def prompt(self) -> str: ...
    @property
    def seed(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each task's files go under one output folder.

    Names are relative to the root, with "/" between folders, as the ledger records them.
    """

    root: Path

    def task_stem(self, task: Named) -> str:
        """``<job>/<model>/<prompt-slug>-s<seed>-<id16>``."""
        return self._stem(task, ID_CHARS)

    def legacy_stem(self, task: Named) -> str:
        """The stem batcher used before 16-character ids (``-<id8>``): files an older run
        made have it, and their ledger rows and sidecars say so."""
        return self._stem(task, LEGACY_ID_CHARS)

    def record_stem(self, record: Named, files: Iterable[str]) -> str:
        """The stem a kept task's ``files`` (its ledger row's) were written under: the
        legacy one for a task an older batcher made, else :meth:`task_stem`."""
        legacy = self.legacy_stem(record)
        # A legacy file is the stem then "." (the extension), "-" (image k of n) or "@" (a
        # derived size); a current name carries hex digits there.
        if any(path.startswith(legacy) and path[len(legacy):len(legacy) + 1] in {".", "-", "@"}
               for path in files):
            return legacy
        return self.task_stem(record)

    @staticmethod
    def _stem(task: Named, id_chars: int) -> str:
        return _stem_of(task.job, task.model, task.prompt, task.seed, task.id, id_chars)

    def image_stem(self, task: Task, index: int, count: int) -> str:
        """Image ``index`` of ``count`` without its extension (known once its bytes are)."""
        suffix = f"-{index}" if count > 1 else ""
        return f"{self.task_stem(task)}{suffix}"

    def image_name(self, task: Task, index: int, count: int, ext: str) -> str:
        return f"{self.image_stem(task, index, count)}.{ext}"

    def text_name(self, task: Task) -> str:
        return f"{self.task_stem(task)}.txt"

    def sidecar_name(self, task: Named) -> str:
        """The task's sidecar: what its ledger row says, beside its files."""
        return f"{self.task_stem(task)}.json"

    def legacy_sidecar_name(self, task: Named) -> str:
        """Where an older batcher put the task's sidecar (8-character ids)."""
        return f"{self.legacy_stem(task)}.json"

    def record_sidecar(self, record: Named, files: Iterable[str]) -> str:
        """The sidecar of a kept task, beside its ``files`` (an older run's name included)."""
        return f"{self.record_stem(record, files)}.json"

    def path(self, relative: str) -> str:
        """Where a name made here lives (no check: these names cannot leave the root)."""
        return os.path.join(self.root, relative)

    def resolve(self, relative: str | Path) -> Path:
        """The absolute path of a file named in the ledger; refuses anything outside the root."""
        path = (self.root / relative).resolve()
        root = self.root.resolve()
        if path != root and root not in path.parents:
            raise ValueError(f"{relative} is outside the output folder")
        return path


@functools.lru_cache(maxsize=4096)  # a task's names are asked for five times as it runs
def _stem_of(job: str, model: str, prompt: str, seed: int | None, task_id: str,
             id_chars: int) -> str:
    # Built as one string: every part is a slug or a hash, so "/" only separates them.
    seed_part = "" if seed is None else f"-s{seed}"
    return (f"{slugify(job, 64)}/{slugify(model, 64)}/"
            f"{slugify(prompt)}{seed_part}-{short_id(task_id, id_chars)}")
