"""The contact sheet, index.html: its links resolve, and a real headless Chromium renders it
with every image loaded (Debian's Chromium, driven by Playwright)."""

from __future__ import annotations

import os
import re
import shutil
import textwrap
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, provider_block, run_cli, write_manifest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img" and values.get("src"):
            self.images.append(values["src"] or "")
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _run_demo(folder: Path) -> Path:
    for name in ("demo.yaml", "ref-a.png", "ref-b.png"):
        shutil.copy(REPO / "jobs" / name, folder / name)
    result = run_cli("run", "demo.yaml", "--no-progress", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "output" / "demo"


def test_every_image_and_completion_is_on_the_sheet_by_relative_link(tmp_path: Path) -> None:
    output = _run_demo(tmp_path)
    page = _Links()
    page.feed((output / "index.html").read_text())
    images = sorted(p.relative_to(output).as_posix() for p in output.rglob("*.png"))
    assert len(images) == 8 + 4 + 1  # posters 2x2x2, postcards 2 seeds x n=2, one edit
    inputs = sorted({src for src in page.images if "/inputs/" in src})
    assert len(inputs) == 2  # the edit's two input images, beside its result
    assert sorted(set(page.images) - set(inputs)) == images
    for src in page.images + page.links:
        assert not re.match(r"^[a-z]+:|^/", src), f"not a relative link: {src}"
        assert (output / src).is_file()
    text = " ".join(page.text)
    for completion in output.rglob("*.txt"):
        assert completion.read_text().strip() in text


def test_thumbnails_tell_their_task_vars_and_params_on_hover(tmp_path: Path) -> None:
    output = _run_demo(tmp_path)
    html = (output / "index.html").read_text()
    titles = re.findall(r"<img loading[^>]*title='([^']*)'", html)  # not the edit's inputs
    assert len(titles) == 13
    amsterdam = [t for t in titles if "city = Amsterdam" in t]
    assert amsterdam and all("size: &quot;256x256&quot;" in t for t in amsterdam)
    assert all(t.startswith("task ") for t in titles)


def test_failed_tasks_stand_in_place_with_their_reason(tmp_path: Path, thread_server) -> None:
    server = thread_server(fail_rate=1.0)
    manifest = write_manifest(tmp_path, textwrap.dedent("""
        name: broken
        jobs:
          - {name: art, type: image, provider: test, model: flux.1-schnell,
             prompt: "A doomed picture", params: {size: 256x256}}
    """) + provider_block(server, extra="retries: 0"))
    result = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    html = (tmp_path / "output/broken/index.html").read_text()
    assert "A doomed picture" in html
    assert "failed: injected permanent failure" in html


# --------------------------------------------------------------------------- a real browser


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium_page() -> Iterator[Any]:
    """A page of Debian's Chromium, headless, driven by Playwright (no browser download)."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                             headless=True)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 2000})
        finally:
            browser.close()


# Lazy images below the fold load once asked; decode() settles when each is loaded.
LOAD_EVERY_IMAGE = """async () => {
    await new Promise(r => document.readyState === 'complete'
        ? r() : addEventListener('load', r));
    const images = Array.from(document.images);
    images.forEach(i => { i.loading = 'eager'; });
    const loaded = await Promise.all(images.map(
        i => i.decode().then(() => i.naturalWidth > 0, () => false)));
    return {count: images.length, loaded: loaded.filter(Boolean).length,
            rows: document.querySelectorAll('tr').length, title: document.title};
}"""


def _distinct_pixels(png: bytes) -> int:
    """How many distinct byte values the screenshot's pixel data holds (blank: a handful)."""
    chunks, position = [], 8
    while position < len(png):
        length = int.from_bytes(png[position:position + 4], "big")
        kind = png[position + 4:position + 8]
        if kind == b"IDAT":
            chunks.append(png[position + 8:position + 8 + length])
        position += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    return len(set(raw[: 4_000_000]))


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it)")
def test_chromium_renders_the_sheet_with_every_image_loaded(tmp_path: Path) -> None:
    assert CHROMIUM is not None, "CI must install chromium for this test"
    output = _run_demo(tmp_path)

    with chromium_page() as page:
        page.goto((output / "index.html").resolve().as_uri())
        state = page.evaluate(LOAD_EVERY_IMAGE)
        screenshot = page.screenshot(type="png")

    assert state["count"] == 13 + 2  # the demo's images and the edit's two input thumbnails
    assert state["loaded"] == 15, state
    assert state["rows"] >= 5
    assert screenshot.startswith(b"\x89PNG")
    assert _distinct_pixels(screenshot) > 50, "the screenshot looks blank"


def test_the_sheet_shows_at_most_5000_tasks_per_job_and_points_to_results(
    tmp_path: Path,
) -> None:
    tasks = 5003
    path = write_manifest(tmp_path, f"""
        name: many
        output: out
        providers:
          local: {{concurrency: 64}}
        jobs:
          - {{name: captions, type: chat, provider: local, model: llama-3.1-8b-instruct,
             prompt: a caption, seeds: {tasks}}}
          - {{name: few, type: chat, provider: local, model: llama-3.1-8b-instruct,
             prompt: another, seeds: 2}}
    """)
    done = run_cli("run", str(path), "--no-progress", timeout=300)
    assert done.returncode == 0, done.stderr

    html = (tmp_path / "out" / "index.html").read_text()
    captions, few = html.split("<h2>few ", 1)
    assert captions.count("<pre>") == 5000
    assert "3 more tasks are listed in results.jsonl" in captions
    assert few.count("<pre>") == 2 and "more tasks" not in few
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == tasks + 2
