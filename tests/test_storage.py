"""File names that stay inside the output folder, and writes that are never partial."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import threading
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher.manifest.tasks import Task
from batcher.store import atomic
from batcher.store.atomic import TMP_PREFIX, AtomicFile, FileWriter, remove_leftovers
from batcher.store.names import Layout, short_id, slugify

WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {
    f"{p}{i}" for p in ("com", "lpt") for i in range(10)
}
SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

HOSTILE = [
    "../../etc/passwd",
    "../../../../../../../../tmp/evil",
    "/etc/passwd",
    "/",
    "..",
    ".",
    "...",
    "..\\..\\windows\\system32\\config",
    "C:\\Windows\\System32",
    "\\\\server\\share\\x",
    "a\x00b",
    "\x00",
    "CON",
    "con",
    "nul",
    "Nul",
    "COM1",
    "lpt9",
    "aux.txt",
    "é" * 300,
    "日本語のプロンプト" * 40,
    "🎉🔥🐍",
    "🎉",
    "",
    " ",
    "-",
    "~",
    "~/.ssh/id_rsa",
    "$HOME/x",
    "a/b/c/d",
    "name\nwith\nnewlines",
    "\u202eevil\u202c.png",
    "x" * 10_000,
    "ab" * 200 + "/../../..",
]


def task(prompt: str, *, job: str = "job", model: str = "model", task_id: str = "0" * 32,
         seed: int | None = 1) -> Task:
    return Task(id=task_id, job=job, kind="image", provider="local", model=model, prompt=prompt,
                seed=seed)


def names_of(layout: Layout, t: Task) -> list[Path]:
    return [Path(name) for name in (layout.task_stem(t), layout.image_name(t, 1, 1, "png"),
                                    layout.image_name(t, 2, 3, "webp"), layout.text_name(t))]


def assert_safe(root: Path, relative: Path) -> None:
    assert not relative.is_absolute(), relative
    assert len(relative.parts) == 3, relative  # <job>/<model>/<file>
    for part in relative.parts:
        assert part not in {"", ".", ".."}, relative
        assert SAFE_PART.match(part), relative
        assert len(part.encode("utf-8")) < 255, relative
        assert part.split(".")[0].lower() not in WINDOWS_RESERVED, relative
    resolved = (root / relative).resolve()
    assert root.resolve() in resolved.parents, relative
    assert Layout(root).resolve(relative) == resolved


# --------------------------------------------------------------------------- slugs and ids


def test_slugify_examples() -> None:
    assert slugify("A Hedgehog eating a Burger in Amsterdam!") == (
        "a-hedgehog-eating-a-burger-in-amsterdam")
    assert slugify("Crème brûlée") == "creme-brulee"
    assert slugify("  --many   spaces--  ") == "many-spaces"
    assert slugify("CON") == "con_" and slugify("nul") == "nul_"


@pytest.mark.parametrize("text", HOSTILE)
def test_slugify_is_safe(text: str) -> None:
    slug = slugify(text)
    assert slug == slugify(text)
    assert slug and SAFE_PART.match(slug)
    assert len(slug) <= 49
    assert slug not in WINDOWS_RESERVED


def test_slugs_of_text_without_ascii_differ() -> None:
    # emoji-only and non-Latin prompts get a hash, not one shared placeholder
    slugs = {slugify(text) for text in ["🎉", "🔥", "日本", "中文", ""]}
    assert len(slugs) == 5


def test_slug_respects_max_length() -> None:
    assert len(slugify("word " * 100, 64)) <= 64
    assert not slugify("word " * 100, 10).endswith("-")


@pytest.mark.parametrize("task_id", HOSTILE + ["hero-1", "0123456789abcdef" * 2, "DEADBEEF"])
def test_short_id_is_sixteen_hex(task_id: str) -> None:
    short = short_id(task_id)
    assert re.fullmatch(r"[0-9a-f]{16}", short)
    assert short == short_id(task_id)


def test_short_id_is_a_hash_even_of_an_id_that_looks_like_one() -> None:
    # A user's id may look like batcher's own and share its first characters with another.
    own = "90d65965622c61f49bf219a36c967f2a"
    assert short_id(own) == hashlib.sha256(own.encode()).hexdigest()[:16]
    assert short_id(own) != short_id("90d65965622c61f4" + "0" * 16)


def test_distinct_user_ids_get_distinct_file_names(tmp_path: Path) -> None:
    # Users choose ids such as row numbers; two tasks with the same prompt must not share a file,
    # or one result overwrites the other.
    layout = Layout(tmp_path / "out")
    for a, b in [("100000001", "100000002"), ("deadbeef-1", "deadbeef-2"),
                 ("abcdef0123", "abcdef0124"), ("hero-1", "hero-2")]:
        first = layout.image_name(task("same prompt", task_id=a), 1, 1, "png")
        second = layout.image_name(task("same prompt", task_id=b), 1, 1, "png")
        assert first != second, (a, b)


# --------------------------------------------------------------------------- layout


def test_layout_names(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    t = task("A Hedgehog in {city}", job="heroes", model="black-forest-labs/FLUX.1-schnell",
             task_id="90d65965622c61f49bf219a36c967f2a", seed=3)
    folder = "heroes/black-forest-labs-flux-1-schnell/"
    stem = folder + "a-hedgehog-in-city-s3-5ff5bc7ae772333e"
    assert layout.task_stem(t) == stem
    assert layout.image_name(t, 1, 1, "png") == stem + ".png"
    assert layout.image_name(t, 2, 4, "png") == stem + "-2.png"
    assert layout.text_name(t) == stem + ".txt"
    assert layout.path(layout.text_name(t)) == str(tmp_path / "out" / layout.text_name(t))
    no_seed = task("p", task_id="90d65965622c61f49bf219a36c967f2a", seed=None)
    assert layout.image_name(no_seed, 1, 1, "png") == "job/model/p-5ff5bc7ae772333e.png"
    # What batcher wrote before: 8 characters, still read where a ledger row names them.
    assert layout.legacy_stem(t) == folder + "a-hedgehog-in-city-s3-5ff5bc7a"
    old = [folder + "a-hedgehog-in-city-s3-5ff5bc7a-2.png"]
    assert layout.record_stem(t, old) == layout.legacy_stem(t)
    assert layout.record_sidecar(t, old) == folder + "a-hedgehog-in-city-s3-5ff5bc7a.json"
    assert layout.record_stem(t, [layout.image_name(t, 1, 1, "png")]) == layout.task_stem(t)


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_names_stay_inside_the_root(tmp_path: Path, text: str) -> None:
    root = tmp_path / "out"
    layout = Layout(root)
    for t in [task(text), task("p", job=text), task("p", model=text), task("p", task_id=text),
              task(text, job=text, model=text, task_id=text, seed=-1),
              task(text, seed=2**64)]:
        first = names_of(layout, t)
        assert first == names_of(layout, t)  # deterministic
        for relative in first:
            assert_safe(root, relative)


async def test_hostile_names_write_inside_the_root(tmp_path: Path, files: FileWriter) -> None:
    root = tmp_path / "out"
    root.mkdir()
    layout = Layout(root)
    for i, text in enumerate(HOSTILE):
        relative = layout.image_name(task(text, job=text, model=text, task_id=f"{text}{i}"),
                                     1, 1, "png")
        await files.write(layout.path(relative), b"data")
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) == len(HOSTILE)
    assert sorted(os.listdir(tmp_path)) == ["home", "out"]


@pytest.mark.parametrize("relative", ["../x", "../../etc/passwd", "/etc/passwd", "a/../../x"])
def test_resolve_refuses_paths_outside_the_root(tmp_path: Path, relative: str) -> None:
    with pytest.raises(ValueError):
        Layout(tmp_path / "out").resolve(relative)


def test_resolve_accepts_ledger_paths(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "out")
    assert layout.resolve("job/model/x.png") == (tmp_path / "out/job/model/x.png").resolve()
    assert layout.resolve(PurePosixPath("a/./b.png")) == (tmp_path / "out/a/b.png").resolve()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(), job=st.text(), model=st.text(), task_id=st.text(),
       seed=st.none() | st.integers(-(2**63), 2**63))
def test_any_text_gives_a_safe_name(tmp_path: Path, prompt: str, job: str, model: str,
                                    task_id: str, seed: int | None) -> None:
    root = tmp_path / "out"
    layout = Layout(root)
    t = task(prompt, job=job, model=model, task_id=task_id, seed=seed)
    names = names_of(layout, t)
    assert names == names_of(layout, t)
    for relative in names:
        assert_safe(root, relative)


@settings(max_examples=200, deadline=None)
@given(text=st.text(), max_length=st.integers(9, 100))
def test_any_text_gives_a_bounded_slug(text: str, max_length: int) -> None:
    slug = slugify(text, max_length)
    assert slug == slugify(text, max_length)
    assert SAFE_PART.match(slug)
    assert len(slug) <= max_length + 1  # + the "_" that defuses a device name


# --------------------------------------------------------------------------- atomic writes


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


@pytest.fixture
async def files() -> AsyncIterator[FileWriter]:
    writer = FileWriter()
    yield writer
    await writer.close()


@pytest.mark.parametrize("size", [0, 1, 1000, 300 * 1024, 3 * 1024 * 1024 + 7])
async def test_write(tmp_path: Path, files: FileWriter, size: int) -> None:
    data = os.urandom(size)
    final = tmp_path / "out" / "job" / "model" / "x.png"  # folders that do not exist yet
    written, sha = await files.write(final, data)
    assert final.read_bytes() == data
    assert written == size == final.stat().st_size
    assert sha == hashlib.sha256(data).hexdigest()
    assert leftovers(tmp_path) == []


async def test_write_replaces_an_existing_file(tmp_path: Path, files: FileWriter) -> None:
    final = tmp_path / "x.txt"
    final.write_bytes(b"old")
    await files.write(final, b"new")
    assert final.read_bytes() == b"new"
    assert leftovers(tmp_path) == []


async def test_concurrent_writes_of_one_folder(tmp_path: Path, files: FileWriter,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    write_batch = atomic._write_batch

    def counted(writes: list[Any]) -> list[Exception | None]:
        batches.append(len(writes))
        return write_batch(writes)

    monkeypatch.setattr(atomic, "_write_batch", counted)
    payloads = {tmp_path / "out" / f"{i}.bin": os.urandom(1000 + i * 40_000) for i in range(12)}
    payloads.update({tmp_path / "out" / f"small-{i}.txt": b"%d" % i for i in range(200)})
    results = await asyncio.gather(*(files.write(path, data) for path, data in payloads.items()))
    for (path, data), (size, sha) in zip(payloads.items(), results, strict=True):
        assert path.read_bytes() == data
        assert (size, sha) == (len(data), hashlib.sha256(data).hexdigest())
    assert leftovers(tmp_path) == []
    # The small files asked for in one turn travel to the writer thread together.
    small = sum(1 for data in payloads.values() if len(data) <= FileWriter.SMALL)
    assert sum(batches) == small and len(batches) <= 2, batches


async def test_one_failed_write_does_not_fail_the_others(tmp_path: Path, files: FileWriter) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("a folder cannot be replaced by a file")
    finals = [tmp_path / "a.txt", tmp_path / "taken", tmp_path / "b.txt"]
    results = await asyncio.gather(*(files.write(final, b"x") for final in finals),
                                   return_exceptions=True)
    assert results[0] == results[2] == (1, hashlib.sha256(b"x").hexdigest())
    assert isinstance(results[1], OSError)
    assert (tmp_path / "a.txt").read_bytes() == (tmp_path / "b.txt").read_bytes() == b"x"
    assert leftovers(tmp_path) == []


async def test_cancelled_writes_while_the_thread_is_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run stopped by a second Ctrl-C: its workers are cancelled while one batch is being
    # written and another waits. close() must still finish, with no error left on the loop.
    release = threading.Event()
    write_one = atomic._write_atomic_sync

    def slow(final: Any, data: bytes) -> None:
        release.wait(10)
        write_one(final, data)

    monkeypatch.setattr(atomic, "_write_atomic_sync", slow)
    loop_errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    files = FileWriter()
    first = asyncio.ensure_future(files.write(tmp_path / "first.txt", b"1"))
    await asyncio.sleep(0.05)  # its batch is in the thread, held
    second = asyncio.ensure_future(files.write(tmp_path / "second.txt", b"2"))
    await asyncio.sleep(0.05)  # queued behind it
    first.cancel()
    second.cancel()
    release.set()
    await asyncio.wait_for(files.close(), 10)
    assert first.cancelled() and second.cancelled()
    # The batch under way completes; the write still waiting is dropped; nothing is partial.
    assert (tmp_path / "first.txt").read_bytes() == b"1"
    assert not (tmp_path / "second.txt").exists()
    assert leftovers(tmp_path) == []
    assert loop_errors == []


def test_a_leftover_temporary_name_is_skipped(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A killed process with the same pid (a container's pid 1, say) left this exact name.
    monkeypatch.setattr(atomic, "_tmp_numbers", itertools.count())
    (tmp_path / f"{TMP_PREFIX}{os.getpid()}-0-report.txt").write_text("left over")
    with atomic.atomic_open(tmp_path / "report.txt", "w") as handle:
        handle.write("fresh")
    assert (tmp_path / "report.txt").read_text() == "fresh"


@pytest.mark.parametrize("size", [10, 2 * 1024 * 1024])
async def test_failed_write_leaves_no_temporary_file(
    tmp_path: Path, files: FileWriter, size: int
) -> None:
    final = tmp_path / "taken"
    final.mkdir()
    (final / "inside").write_text("a folder cannot be replaced by a file")
    with pytest.raises(OSError):
        await files.write(final, b"x" * size)
    assert leftovers(tmp_path) == []
    assert (final / "inside").exists()


async def test_atomic_file(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "x.bin"
    async with AtomicFile(final) as handle:
        await handle.write(b"hello ")
        await handle.write(b"world")
        assert not final.exists()  # nothing under the final name until it is complete
    assert final.read_bytes() == b"hello world"
    assert handle.size == 11
    assert handle.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert leftovers(tmp_path) == []


async def test_atomic_file_error_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "x.bin"
    with pytest.raises(RuntimeError):
        async with AtomicFile(final) as handle:
            await handle.write(b"partial")
            raise RuntimeError("the download broke")
    assert not final.exists()
    assert leftovers(tmp_path) == []


async def test_atomic_file_error_keeps_the_previous_file(tmp_path: Path) -> None:
    final = tmp_path / "x.bin"
    final.write_bytes(b"finished earlier")
    with pytest.raises(RuntimeError):
        async with AtomicFile(final) as handle:
            await handle.write(b"partial")
            raise RuntimeError
    assert final.read_bytes() == b"finished earlier"
    assert leftovers(tmp_path) == []


def test_remove_leftovers_deletes_only_temporary_files(tmp_path: Path) -> None:
    root = tmp_path / "out"
    (root / "job" / "model").mkdir(parents=True)
    (root / ".tmp-dir").mkdir()
    doomed = [root / ".tmp-123-abc-x.png", root / "job" / "model" / ".tmp-9-x.json",
              root / ".tmp-dir" / ".tmp-1-y"]
    kept = [root / "ledger.sqlite", root / "job" / "model" / "x.png",
            root / "job" / "model" / "a.tmp-1", root / ".tmpfile", root / "tmp-1",
            root / ".tmp-dir" / "keep.png"]
    for path in doomed + kept:
        path.write_bytes(b"x")
    assert remove_leftovers(root) == len(doomed)
    assert not any(p.exists() for p in doomed)
    assert all(p.exists() for p in kept)
    assert remove_leftovers(root) == 0


def test_remove_leftovers_of_a_missing_folder(tmp_path: Path) -> None:
    assert remove_leftovers(tmp_path / "never-made") == 0
