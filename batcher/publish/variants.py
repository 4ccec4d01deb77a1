"""The asset set of a manifest: each asset's variants in expansion order, what a person decided
for them, and the variant to publish.

A variant is one image of one task (``image`` from 1; a task with ``n`` > 1 has several), or a
chat task's text. It is ok when its task's ledger row is ok and the file is there. The chosen
variant is the pick, else the first ok, unrejected variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from batcher.errors import ManifestError
from batcher.manifest import JobSpec, Manifest
from batcher.manifest.named import named_tasks
from batcher.manifest.tasks import Task
from batcher.publish.picks import Decision, Selector
from batcher.records import FileRecord, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Variant:
    """One candidate file of an asset."""

    task: Task
    image: int  # 1-based within the task
    record: Record | None = None  # the task's ok ledger row, files present
    file: FileRecord | None = None  # the delivered file, when ok

    @property
    def seed(self) -> int | None:
        return self.task.seed

    @property
    def model(self) -> str:
        return self.task.model

    @property
    def ok(self) -> bool:
        return self.file is not None

    def selector(self, models: int, images: int) -> Selector:
        """The shortest selector that names this variant among its asset's."""
        return Selector(seed=self.seed, model=self.model if models > 1 else None,
                        image=self.image if images > 1 else None)


@dataclass(slots=True)
class Asset:
    """One name of the set, its variants, and the decision on it."""

    name: str
    job: JobSpec
    variants: list[Variant] = field(default_factory=list)
    decision: Decision | None = None

    def rejected(self, variant: Variant) -> bool:
        return self.decision is not None and any(s.matches(variant)
                                                 for s in self.decision.rejects)

    def picked(self) -> Variant | None:
        """The variant the pick names, when it names exactly one."""
        if self.decision is None or self.decision.pick is None:
            return None
        found = [v for v in self.variants if self.decision.pick.matches(v)]
        return found[0] if len(found) == 1 else None

    def good(self) -> list[Variant]:
        """The ok, unrejected variants, in expansion order."""
        return [v for v in self.variants if v.ok and not self.rejected(v)]

    def chosen(self) -> Variant | None:
        """The variant to publish: the pick (when ok), else the first ok, unrejected one."""
        pick = self.picked()
        if pick is not None:
            return pick if pick.ok else None
        good = self.good()
        return good[0] if good else None

    @property
    def decided(self) -> bool:
        return self.picked() is not None

    def selector_of(self, variant: Variant) -> Selector:
        models = len({v.model for v in self.variants})
        images = max(v.image for v in self.variants)
        return variant.selector(models, images)


Lookup = Callable[[str], Record | None]


def collect_assets(manifest: Manifest, decisions: Mapping[str, Decision],
                   ok_record: Lookup) -> dict[str, Asset]:
    """Every asset of the manifest by name, in expansion order, with its variants;
    ``ok_record`` gives a task's ok ledger row whose files are present (else ``None``)."""
    assets: dict[str, Asset] = {}
    for name, job, task in named_tasks(manifest):
        asset = assets.get(name)
        if asset is None:
            asset = assets[name] = Asset(name, job, decision=decisions.get(name))
        asset.variants.extend(_variants(task, ok_record(task.id)))
    return assets


def _variants(task: Task, record: Record | None) -> Iterable[Variant]:
    if record is not None and record.files:
        for index, file in enumerate(record.files, start=1):
            yield Variant(task, index, record, file)
        return
    count = (task.params or {}).get("n", 1)
    count = count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 1
    for index in range(1, count + 1):
        yield Variant(task, index)


def stale_entries(assets: Mapping[str, Asset], decisions: Mapping[str, Decision]) -> list[str]:
    """What in the picks file matches nothing: never an error, never re-pointed."""
    found = []
    for name, decision in decisions.items():
        asset = assets.get(name)
        if asset is None:
            found.append(f"{name}: no asset of that name in the manifest")
            continue
        selectors = ([("pick", decision.pick)] if decision.pick else []) + \
            [("reject", s) for s in decision.rejects]
        for kind, selector in selectors:
            if not any(selector.matches(v) for v in asset.variants):
                found.append(f"{name}: {kind} {{{selector.text()}}} matches no variant")
    return found


def check_picks(assets: Mapping[str, Asset], decisions: Mapping[str, Decision],
                picks_file: str) -> None:
    """A pick that matches several variants is a mistake to fix (exit 2): which one? So is a
    pick of a variant the same entry rejects."""
    for name, decision in decisions.items():
        asset = assets.get(name)
        if asset is None or decision.pick is None:
            continue
        found = [v for v in asset.variants if decision.pick.matches(v)]
        if len(found) > 1:
            raise ManifestError(f"{{{decision.pick.text()}}} matches {len(found)} variants; "
                                "name the model or image too", file=picks_file,
                                line=decision.line, field=f"{name}.pick")
        both = next((s for s in decision.rejects if found and s.matches(found[0])), None)
        if both is not None:
            raise ManifestError(f"{{{decision.pick.text()}}} is picked and rejected (by "
                                f"{{{both.text()}}}); keep one of the two", file=picks_file,
                                line=decision.line, field=f"{name}.pick")
