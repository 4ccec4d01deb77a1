"""`batcher review` in headless Chromium (Debian's, driven by Playwright; no browser download):
clicks and keys change the picks file, a reload shows them, on folder and bucket outputs."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, start_cli
from s3server import S3Server, s3, store_env
from test_assets import catalogue_manifest

__all__ = ["s3"]  # the fixture, used by name

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                                reason="needs Debian's chromium (apt-get install chromium)")


@contextlib.contextmanager
def review(manifest: Path, cwd: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """`batcher review` running; yields its URL."""
    process = start_cli("review", str(manifest), cwd=cwd, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert found, (line, process.stderr.read() if process.poll() is not None else "")
        yield found[0]
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()
            process.wait()


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                             args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def saved(page: Any, count: int) -> None:
    """Wait until the page has had ``count`` decisions written."""
    page.wait_for_function(f"Number(document.body.dataset.saved || 0) >= {count}")


def test_clicks_and_keys_write_the_picks_file_and_a_reload_shows_them(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    picks = tmp_path / "jobs.picks.yaml"
    picks.write_text("icons/OLD: {pick: {seed: 3}}\n")  # stale: kept as written
    with review(manifest, tmp_path) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector(".variant img")
        page.wait_for_function("[...document.querySelectorAll('.variant img')]"
                               ".every(e => e.complete && e.naturalWidth > 0)")
        assert len(page.query_selector_all(".variant img")) == 6

        page.click("section[data-name='icons/A1'] .variant[data-variant='1']")
        saved(page, 1)
        assert picks.read_text() == ("icons/A1: {pick: {seed: 1}}\n"
                                     "icons/OLD: {pick: {seed: 3}}\n")

        page.keyboard.press("ArrowDown")  # icons/A2, seed 1 (the focus keeps its column)
        page.keyboard.press("ArrowLeft")  # seed 0
        page.keyboard.press("x")
        saved(page, 2)
        page.keyboard.press("ArrowDown")  # icons/B7, seed 0
        page.keyboard.press("ArrowRight")
        page.keyboard.press("P")
        saved(page, 3)
        assert picks.read_text() == ("icons/A1: {pick: {seed: 1}}\n"
                                     "icons/A2: {reject: [{seed: 0}]}\n"
                                     "icons/B7: {pick: {seed: 1}}\n"
                                     "icons/OLD: {pick: {seed: 3}}\n")

        page.reload()
        page.wait_for_selector(".variant img")
        assert page.get_attribute("section[data-name='icons/A1'] .variant.picked",
                                  "data-variant") == "1"
        assert page.get_attribute("section[data-name='icons/A2'] .variant.rejected",
                                  "data-variant") == "0"
        assert page.get_attribute("section[data-name='icons/A2'] .variant.chosen",
                                  "data-variant") == "1"

        page.keyboard.press("u")  # only the undecided: A2 has a reject, no pick
        shown = page.eval_on_selector_all(
            "section.asset", "els => els.filter(e => e.offsetParent !== null)"
            ".map(e => e.dataset.name)")
        assert shown == ["icons/A2"]
        page.keyboard.press("x")  # the focus moved to A2's first variant: take the reject back
        saved(page, 1)
    assert picks.read_text() == ("icons/A1: {pick: {seed: 1}}\n"
                                 "icons/B7: {pick: {seed: 1}}\n"
                                 "icons/OLD: {pick: {seed: 3}}\n")
    published = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert published.returncode == 0 and "icons/OLD" in published.stderr  # a stale warning


def test_review_of_a_bucket_output(tmp_path: Path, thread_server: Any, s3: S3Server) -> None:
    server = thread_server()
    env = store_env(s3.url, str(tmp_path / "cache"))
    manifest = catalogue_manifest(server, tmp_path)
    manifest.write_text(manifest.read_text().replace("output: out",
                                                     f"output: s3://{s3.bucket()}/runs"))
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path, env=env).returncode == 0
    with review(manifest, tmp_path, env) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector(".variant img")
        page.wait_for_function("[...document.querySelectorAll('.variant img')]"
                               ".every(e => e.complete && e.naturalWidth > 0)")
        page.click("section[data-name='icons/B7'] .variant[data-variant='1']")
        saved(page, 1)
    assert (tmp_path / "jobs.picks.yaml").read_text() == "icons/B7: {pick: {seed: 1}}\n"


def test_the_contact_sheet_groups_by_asset_and_marks_decisions(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    sheet = tmp_path / "out" / "index.html"
    (tmp_path / "jobs.picks.yaml").write_text("icons/A1: {pick: {seed: 1}}\n"
                                              "icons/A2: {reject: [{seed: 0}]}\n")
    done = run_cli("report", str(manifest), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    with browser_page() as page:
        page.goto(sheet.resolve().as_uri())
        rows = page.eval_on_selector_all("tr[data-asset]", "els => els.map(e => e.dataset.asset)")
        assert rows == ["icons/A1", "icons/A2", "icons/B7"]
        states = page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
            'tr[data-asset]')].map(tr => [tr.dataset.asset, [...tr.querySelectorAll('img')]
            .map(img => img.className)]))""")
        assert states == {"icons/A1": ["", "picked"], "icons/A2": ["rejected", "published"],
                          "icons/B7": ["published", ""]}
        page.wait_for_function("[...document.images].every(i => i.complete && i.naturalWidth)")


def test_a_run_writes_its_sheet_grouped_by_asset(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    html = (tmp_path / "out" / "index.html").read_text()
    assert html.count("<tr data-asset=") == 3 and html.count("class='published'") == 3
