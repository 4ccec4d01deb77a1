"""``batcher publish``: write exactly the asset set to a folder or a bucket.

For each asset, the chosen variant's files under its name: ``<name>.<ext>`` (the job's
``outputs`` format, else the delivered file; chat: ``<name>.txt``) and ``<name>@<size>.<ext>``
for each size; then ``assets.json``, sorted, without a timestamp, written last. A file whose
bytes are there already is not written again; the files the previous assets.json listed for an
asset that left the set are removed; nothing else in the target is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from batcher.errors import BatcherError, UsageError
from batcher.location import StoreURL
from batcher.manifest.assets import name_problem
from batcher.outputs import entries
from batcher.publish.source import RunFiles, StoreFiles
from batcher.publish.variants import Asset, Variant
from batcher.store.atomic import TMP_PREFIX, atomic_open

if TYPE_CHECKING:
    from batcher.store.objects import ObjectStore

ASSETS_NAME = "assets.json"


@dataclass(frozen=True, slots=True)
class SetFile:
    """One file of the set: where it goes, where it comes from in the run, what it holds."""

    path: str
    source: str
    size: int
    sha256: str


@dataclass(slots=True)
class SetPlan:
    """What the set is: its files, assets.json's entries, and the assets left without a
    variant (their previous entries carried over)."""

    files: list[SetFile] = field(default_factory=list)
    listed: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[tuple[str, str]] = field(default_factory=list)


def variant_files(name: str, variant: Variant) -> list[SetFile]:
    """The files of a variant under an asset's name."""
    file, record = variant.file, variant.record
    assert file is not None and record is not None
    if record.kind == "chat":
        return [SetFile(f"{name}.txt", file.path, file.size, file.sha256)]
    own = [e for e in entries(record.derived) if e.get("of") == file.path]
    full = next((e for e in own if e.get("role") == "full"), None)
    main = SetFile(f"{name}{_ext(file.path)}", file.path, file.size, file.sha256) \
        if full is None else _from_entry(f"{name}{_ext(full['path'])}", full)
    sizes = [_from_entry(f"{name}@{str(e['role']).removeprefix('size:')}{_ext(e['path'])}", e)
             for e in own if str(e.get("role", "")).startswith("size:")]
    return [main, *sorted(sizes, key=lambda f: f.path)]


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1]


def _from_entry(path: str, entry: Mapping[str, Any]) -> SetFile:
    return SetFile(path, str(entry["path"]), int(entry["size"]), str(entry["sha256"]))


def plan_set(assets: Mapping[str, Asset], previous: Mapping[str, Any]) -> SetPlan:
    plan = SetPlan()
    for name in sorted(assets):
        asset = assets[name]
        variant = asset.chosen()
        if variant is None:
            plan.missing.append((name, _why_missing(asset)))
            if name in previous:
                plan.listed[name] = previous[name]
            continue
        files = variant_files(name, variant)
        plan.files.extend(files)
        record = variant.record
        assert record is not None
        plan.listed[name] = {
            "files": [{"path": f.path, "bytes": f.size, "sha256": f.sha256} for f in files],
            "job": record.job, "model": record.model, "seed": record.seed,
            "prompt": record.prompt, "task_id": record.id, "cost_usd": record.cost_usd,
        }
    return plan


def _why_missing(asset: Asset) -> str:
    pick = asset.picked()
    if pick is not None:
        return f"the picked variant ({asset.selector_of(pick).text()}) is not ok"
    if not any(v.ok for v in asset.variants):
        return "no ok variant (not run yet, or failed)"
    return "every ok variant is rejected"


def render_assets(listed: Mapping[str, Any]) -> bytes:
    return (json.dumps({"assets": dict(listed)}, sort_keys=True, indent=2,
                       ensure_ascii=False) + "\n").encode()


def previous_files(previous: Mapping[str, Any]) -> set[str]:
    """Every path the previous assets.json listed."""
    found = set()
    for entry in previous.values():
        for item in entry.get("files", []) if isinstance(entry, Mapping) else []:
            if isinstance(item, Mapping) and isinstance(item.get("path"), str):
                found.add(item["path"])
    return found


def is_file_of(name: str, path: str) -> bool:
    """Whether ``path`` is one a set writes for the asset ``name``: ``<name>.<ext>`` or
    ``<name>@<size>.<ext>`` (the only files a previous assets.json may have removed)."""
    return name_problem(name) is None and \
        re.fullmatch(re.escape(name) + r"(@[A-Za-z0-9_-]+)?\.[A-Za-z0-9]+", path) is not None


def _under(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path


def _inside(path: str) -> bool:
    """Whether ``path`` names a file inside the target (relative, no '..', no '\\')."""
    return not path.startswith("/") and "\\" not in path and \
        all(part not in {"", ".", ".."} for part in path.split("/"))


class Target(Protocol):
    """Where a set is published."""

    location: str

    async def read(self, path: str) -> bytes | None: ...
    async def holds(self, file: SetFile) -> bool: ...
    async def write(self, path: str, data: bytes) -> None: ...
    async def remove(self, path: str) -> None: ...
    def check(self, paths: list[str]) -> None: ...
    def sweep(self, paths: list[str]) -> list[str]: ...


class FolderTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.location = str(root)

    def _path(self, path: str) -> Path:
        if not _inside(path):
            raise UsageError(f"{path}: not a name inside the target")
        return self.root / path

    async def read(self, path: str) -> bytes | None:
        try:
            return self._path(path).read_bytes()
        except OSError:
            return None

    async def holds(self, file: SetFile) -> bool:
        path = self._path(file.path)
        try:
            if path.stat().st_size != file.size:
                return False
            return hashlib.sha256(path.read_bytes()).hexdigest() == file.sha256
        except OSError:
            return False

    async def write(self, path: str, data: bytes) -> None:
        final = self._path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(final) as handle:
            handle.write(data)

    async def remove(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    def check(self, paths: list[str]) -> None:
        """Refuse (exit 2, before anything is written) a path that goes through a symbolic
        link (it could lead out of the target), or whose folder or file is in the way."""
        if self.root.exists() and not self.root.is_dir():
            raise UsageError(f"--to {self.root}: not a folder")
        for path in paths:
            at = self.root
            parts = self._path(path).relative_to(self.root).parts
            for index, part in enumerate(parts):
                at = at / part
                last = index == len(parts) - 1
                if at.is_symlink():
                    raise UsageError(f"{at}: a symbolic link in the target; publish follows "
                                     "none (it could lead outside the target)")
                if not at.exists():
                    break
                if last and at.is_dir():
                    raise UsageError(f"{at}: a folder where the set has the file {path}")
                if not last and not at.is_dir():
                    raise UsageError(f"{at}: a file where the set needs a folder (for {path})")

    def sweep(self, paths: list[str]) -> list[str]:
        """Remove the temporary files a killed publish left beside the set's files (the names
        batcher's atomic writer makes: ``.tmp-<pid>-<n>-<file name>``)."""
        wanted: dict[Path, set[str]] = {}
        for path in paths:
            final = self._path(path)
            wanted.setdefault(final.parent, set()).add(final.name)
        removed = []
        for folder, names in wanted.items():
            try:
                found = list(os.scandir(folder))
            except OSError:
                continue
            for entry in found:
                left = _LEFTOVER.fullmatch(entry.name)
                if left and left[1] in names and entry.is_file(follow_symlinks=False):
                    Path(entry.path).unlink(missing_ok=True)
                    removed.append(Path(entry.path).relative_to(self.root).as_posix())
        return removed


_LEFTOVER = re.compile(re.escape(TMP_PREFIX) + r"\d+-\d+-(.+)")


class StoreTarget:
    """A bucket: its listing gives sizes; an object of the right size is read and hashed
    before it counts as already there (a killed publish or a hand edit can leave other
    bytes of the same size under a name)."""

    def __init__(self, url: StoreURL) -> None:
        from batcher.store.objects import ObjectStore

        self.store = ObjectStore(url)
        self.url = url
        self.location = str(url)
        self._bucket: ObjectStore | None = None  # the bucket's root, for copies
        self.listing: dict[str, int] = {}

    async def open(self) -> None:
        from batcher.store.working import first_listing

        self.listing = await first_listing(self.store)

    async def read(self, path: str) -> bytes | None:
        got = await self.store.get_bytes(path)
        return None if got is None else got[0]

    async def holds(self, file: SetFile) -> bool:
        if self.listing.get(file.path) != file.size:
            return False
        return await _object_sha256(self.store, file.path) == file.sha256

    def check(self, paths: list[str]) -> None:
        """Nothing is in the way in a bucket (no folders, no links)."""

    def sweep(self, paths: list[str]) -> list[str]:
        return []  # a bucket's uploads are whole or absent

    async def write(self, path: str, data: bytes) -> None:
        await self.store.put_bytes(path, data)

    async def copy_in(self, source: StoreFiles, file: SetFile) -> bool:
        """Copy the file from another prefix of the same bucket, in the store; False when
        the source is in another bucket. The source is read and checked against its recorded
        sha256 first, as on the other routes; when the copy's ETag is not the source's, the
        copy is hashed, and replaced by the checked bytes if it differs."""
        from batcher.store.objects import ObjectStore

        if (source.url.scheme, source.url.bucket) != (self.url.scheme, self.url.bucket):
            return False
        got = await source.store.get_bytes(file.source)
        if got is None or hashlib.sha256(got[0]).hexdigest() != file.sha256:
            raise _changed(source, file)
        data, e_tag = got
        if self._bucket is None:
            self._bucket = ObjectStore(StoreURL(self.url.scheme, self.url.bucket, ""))
        await self._bucket.copy(_under(source.url.prefix, file.source),
                                _under(self.url.prefix, file.path))
        same = e_tag is not None and await self.store.version(file.path) == e_tag
        if not same and await _object_sha256(self.store, file.path) != file.sha256:
            await self.store.put_bytes(file.path, data)
            return False
        return True

    async def remove(self, path: str) -> None:
        await self.store.delete(path)


async def _object_sha256(store: ObjectStore, name: str) -> str | None:
    digest = hashlib.sha256()
    try:
        async for chunk in store.chunks(name):
            digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def _changed(source: RunFiles, file: SetFile) -> BatcherError:
    return BatcherError(f"{source.location}/{file.source} is missing or changed since it was "
                        "recorded (batcher status --verify); assets.json is left as it was")


async def open_target(to: Path | StoreURL) -> FolderTarget | StoreTarget:
    if isinstance(to, StoreURL):
        target = StoreTarget(to)
        await target.open()
        return target
    return FolderTarget(to)


async def read_previous(target: FolderTarget | StoreTarget) -> dict[str, Any]:
    """The assets the target's assets.json lists (none when there is none). One batcher did
    not write (a wrong shape, or a file that is not ``<name>[@size].<ext>`` of its own entry's
    name) is refused, exit 2, before anything is written: its files are the only ones publish
    ever removes."""
    data = await target.read(ASSETS_NAME)
    if data is None:
        return {}
    where = f"{target.location}/{ASSETS_NAME}"
    try:
        parsed = json.loads(data)
        assets = parsed["assets"]
        if not isinstance(assets, dict):
            raise TypeError
    except (ValueError, TypeError, KeyError):
        raise UsageError(f"{where} is not an assets.json batcher wrote; move it away to "
                         "publish here") from None
    for name, entry in assets.items():
        problem = _entry_problem(name, entry)
        if problem:
            raise UsageError(f"{where}: {name!r}: {problem}; it is not an assets.json "
                             "batcher wrote: move it away to publish here")
    return assets


def _entry_problem(name: str, entry: Any) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        return "has no list of files"
    for item in entry["files"]:
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, str):
            return "a file without a path"
        if not _inside(path) or not is_file_of(name, path):
            return f"lists {path!r}, not a file publish writes for that name"
    return None


@dataclass(slots=True)
class Outcome:
    written: list[str] = field(default_factory=list)
    copied: int = 0  # of those written, copied inside the store
    unchanged: int = 0
    removed: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # temporary files a killed publish left
    listing_written: bool = False


async def publish_set(plan: SetPlan, previous: Mapping[str, Any], source: RunFiles,
                      target: FolderTarget | StoreTarget, *, dry_run: bool) -> Outcome:
    """Write the set's files, remove those of assets that left, then assets.json."""
    outcome = Outcome()
    wanted = {f.path for f in plan.files}
    gone = sorted(previous_files(previous) - wanted - previous_files(plan.listed))
    target.check([*wanted, *gone, ASSETS_NAME])
    if not dry_run:
        outcome.swept = target.sweep([*wanted, ASSETS_NAME])
    for file in plan.files:
        if await target.holds(file):
            outcome.unchanged += 1
            continue
        outcome.written.append(file.path)
        if dry_run:
            continue
        if isinstance(source, StoreFiles) and isinstance(target, StoreTarget) and \
                await target.copy_in(source, file):
            outcome.copied += 1
        else:
            data = await source.read(file.source)
            if data is None or hashlib.sha256(data).hexdigest() != file.sha256:
                raise _changed(source, file)
            await target.write(file.path, data)
    for path in gone:
        outcome.removed.append(path)
        if not dry_run:
            await target.remove(path)
    listing = render_assets(plan.listed)
    if await target.read(ASSETS_NAME) != listing:
        outcome.listing_written = True
        if not dry_run:
            await target.write(ASSETS_NAME, listing)
    return outcome
