"""The hostile review of issue 20 (asset sets), one test per finding: publish never removes or
overwrites anything but the set's own files, never publishes bytes other than the recorded ones,
and every bad input is exit 2 with nothing written; the review page saves every decision, for
the asset it was made on, and only from its own page."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import provider_block, run_cli, write_manifest
from s3server import S3Server, s3, store_env
from test_assets import catalogue_manifest
from test_review import CHROMIUM, browser_page, saved

__all__ = ["s3"]  # the fixture, used by name

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists() and not shutil.which("chromium"),
                                    reason="needs Debian's chromium (apt-get install chromium)")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def ran(server: Any, folder: Path, **options: Any) -> Path:
    manifest = catalogue_manifest(server, folder, **options)
    done = run_cli("run", str(manifest), "--no-progress", cwd=folder)
    assert done.returncode == 0, done.stderr
    return manifest


def no_traceback(done: Any) -> None:
    assert "Traceback" not in done.stderr, done.stderr


# 4: a previous assets.json may only have its own asset files removed, never through a link


def test_a_forged_assets_json_removes_nothing_and_is_exit_2(
    tmp_path: Path, thread_server: Any
) -> None:
    manifest = ran(thread_server(), tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the set's")
    site = tmp_path / "site"
    (site / ".git").mkdir(parents=True)
    (site / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (site / "logo.png").write_bytes(b"the user's logo")
    (site / "shared").symlink_to(outside)
    for listed in [".git/HEAD", "logo.png", "shared/secret.txt"]:
        forged = {"assets": {"gone/X1": {"files": [{"path": listed, "bytes": 1,
                                                    "sha256": "0" * 64}]}}}
        (site / "assets.json").write_text(json.dumps(forged))
        before = files_under(site)

        done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)

        assert done.returncode == 2, (listed, done.stdout, done.stderr)
        assert "assets.json" in done.stderr and listed in done.stderr
        no_traceback(done)
        assert files_under(site) == before
        assert (outside / "secret.txt").read_text() == "not the set's"


def test_a_link_in_the_target_is_never_followed(tmp_path: Path, thread_server: Any) -> None:
    manifest = ran(thread_server(), tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "icons").symlink_to(outside)  # the set's folder leads out of the target

    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)

    assert done.returncode == 2 and "link" in done.stderr, done.stderr
    no_traceback(done)
    assert list(outside.iterdir()) == [] and not (site / "assets.json").exists()


def test_an_asset_that_left_has_exactly_its_own_files_removed(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = ran(server, tmp_path)
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    site = tmp_path / "site"
    (site / "icons" / "A1-notes.png").write_bytes(b"the user's")
    manifest = ran(server, tmp_path, csv="sku,item\nA2,a green pear\nB7,a blue plum\n")

    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert "removed icons/A1.png" in done.stdout
    assert sorted(files_under(site)) == ["assets.json", "icons/A1-notes.png", "icons/A2.png",
                                         "icons/B7.png"]


# 3: a bucket object of the right size is not taken for the set's file unread


def test_a_bucket_object_of_the_right_size_but_other_bytes_is_written_again(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    env = store_env(s3.url, str(tmp_path / "cache"))
    manifest = ran(thread_server(), tmp_path)
    bucket = s3.bucket()
    to = f"s3://{bucket}/live"
    assert run_cli("publish", str(manifest), "--to", to, cwd=tmp_path, env=env).returncode == 0
    listing = json.loads(s3.get(bucket, "live/assets.json"))["assets"]
    recorded = listing["icons/A1"]["files"][0]
    # What a publish killed before assets.json leaves: other bytes of the same size.
    other = bytearray(s3.get(bucket, "live/icons/A1.png"))
    other[-1] ^= 0xFF
    s3.put(bucket, "live/icons/A1.png", bytes(other))

    done = run_cli("publish", str(manifest), "--to", to, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    assert "wrote icons/A1.png" in done.stdout
    assert sha(s3.get(bucket, "live/icons/A1.png")) == recorded["sha256"]


# 5: a server-side copy is checked like every other route


def test_a_run_object_changed_in_place_is_not_copied_into_the_set(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    env = store_env(s3.url, str(tmp_path / "cache"))
    bucket = s3.bucket()
    manifest = catalogue_manifest(thread_server(), tmp_path,
                                  csv="sku,item\nA1,a red apple\n", seeds=1)
    output = f"s3://{bucket}/runs/shop"
    done = run_cli("run", str(manifest), "--no-progress", "--output", output, cwd=tmp_path,
                   env=env)
    assert done.returncode == 0, done.stderr
    key = next(k for k in s3.keys(bucket) if k.startswith("runs/shop/") and k.endswith(".png"))
    changed = bytearray(s3.get(bucket, key))
    changed[-1] ^= 0xFF  # same size, other bytes
    s3.put(bucket, key, bytes(changed))

    done = run_cli("publish", str(manifest), "--output", output, "--to", f"s3://{bucket}/live",
                   cwd=tmp_path, env=env)

    assert done.returncode != 0 and "changed" in done.stderr, (done.stdout, done.stderr)
    no_traceback(done)
    assert not [k for k in s3.keys(bucket) if k.startswith("live/")]


# 8: names whose files would collide are manifest errors at their row


@pytest.mark.parametrize("skus", [["a", "a.png/b"], ["assets.json/x"], ["x" * 101],
                                  [".git/HEAD"]])
def test_names_whose_files_collide_are_manifest_errors(
    tmp_path: Path, thread_server: Any, skus: list[str]
) -> None:
    csv = "sku,item\n" + "".join(f"{sku},item {i}\n" for i, sku in enumerate(skus))
    manifest = catalogue_manifest(thread_server(), tmp_path, asset="{sku}", csv=csv)

    done = run_cli("validate", str(manifest), cwd=tmp_path)

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "catalogue.csv:" in done.stderr
    no_traceback(done)


# 10, 13: a target that is no place to publish is a usage error


def test_an_empty_or_file_or_dotted_target_is_exit_2(tmp_path: Path, thread_server: Any) -> None:
    manifest = ran(thread_server(), tmp_path)
    (tmp_path / "afile").write_text("a user's file")
    before = files_under(tmp_path)
    for to in ["", "afile", "s3://bucket/./out", "s3://bucket/a//b"]:
        done = run_cli("publish", str(manifest), "--to", to, cwd=tmp_path)
        assert done.returncode == 2, (to, done.stdout, done.stderr)
        no_traceback(done)
    assert files_under(tmp_path) == before


# 14: a malformed previous assets.json


@pytest.mark.parametrize("entry", [{"files": None}, {"files": [None]}, None,
                                   {"files": [{"path": 3}]}])
def test_a_malformed_previous_assets_json_is_exit_2_naming_it(
    tmp_path: Path, thread_server: Any, entry: Any
) -> None:
    manifest = ran(thread_server(), tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "assets.json").write_text(json.dumps({"assets": {"icons/A1": entry}}))
    before = files_under(site)

    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)

    assert done.returncode == 2 and "assets.json" in done.stderr, done.stderr
    no_traceback(done)
    assert files_under(site) == before


# 9: a killed publish's temporary files are cleaned up


def test_temporary_files_a_killed_publish_left_are_removed(
    tmp_path: Path, thread_server: Any
) -> None:
    manifest = ran(thread_server(), tmp_path)
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    icons = tmp_path / "site" / "icons"
    (icons / ".tmp-99999-4-B7.png").write_bytes(b"half a file")
    (tmp_path / "site" / ".tmp-99999-9-assets.json").write_bytes(b"{")
    (icons / ".tmp-notes").write_text("the user's")

    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert sorted(files_under(tmp_path / "site")) == [
        "assets.json", "icons/.tmp-notes", "icons/A1.png", "icons/A2.png", "icons/B7.png"]


# 12: a pick and a reject of one variant


def test_a_pick_of_a_rejected_variant_is_exit_2_at_its_line(
    tmp_path: Path, thread_server: Any
) -> None:
    manifest = ran(thread_server(), tmp_path)
    (tmp_path / "jobs.picks.yaml").write_text(
        "icons/A1: {pick: {seed: 0}}\nicons/A2: {pick: {seed: 1}, reject: [{seed: 1}]}\n")

    for command in [["validate", str(manifest)], ["publish", str(manifest), "--to", "site"]]:
        done = run_cli(*command, cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "jobs.picks.yaml:2" in done.stderr
        no_traceback(done)
    assert not (tmp_path / "site").exists()


# 7: variants no selector can tell apart


def test_two_rows_under_one_name_with_one_seed_are_a_manifest_error(
    tmp_path: Path, thread_server: Any
) -> None:
    csv = "sku,item\nA1,a red apple\nA1,a green apple\n"
    manifest = catalogue_manifest(thread_server(), tmp_path, asset="icons/{sku}", csv=csv)

    done = run_cli("validate", str(manifest), cwd=tmp_path)

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "catalogue.csv:3" in done.stderr and "row 2" in done.stderr
    assert "icons/A1" in done.stderr
    no_traceback(done)


def test_two_prompts_under_one_name_are_a_manifest_error(
    tmp_path: Path, thread_server: Any
) -> None:
    text = "name: shop\noutput: out\n" + provider_block(thread_server()) + textwrap.dedent("""\
        jobs:
          - name: icons
            type: image
            provider: test
            model: flux.1-schnell
            prompts: ["an icon of a {item}", "a badge of a {item}"]
            vars: {item: [apple]}
            asset: "icons/{item}"
            seeds: 2
        """)
    manifest = write_manifest(tmp_path, text)

    done = run_cli("validate", str(manifest), cwd=tmp_path)

    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "jobs.yaml:" in done.stderr and "icons/apple" in done.stderr
    no_traceback(done)


@contextlib.contextmanager
def review(manifest: Path, cwd: Path) -> Iterator[str]:
    """`batcher review` running (its warnings, one per stale entry, to a file); its URL."""
    with (cwd / "review.err").open("w") as errors:
        process = subprocess.Popen([sys.executable, "-m", "batcher", "review", str(manifest)],
                                   cwd=cwd, env=dict(os.environ), stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            found = re.search(r"http://127\.0\.0\.1:\d+/", line)
            assert found, (line, (cwd / "review.err").read_text())
            yield found[0]
        finally:
            process.terminate()
            process.wait(30)


# The review server: 2 (every decision saved), 6 (only its own page), 11 (comments kept)


def post(url: str, body: Any, headers: dict[str, str] | None = None) -> int:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = urllib.request.Request(url + "api/decide", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_concurrent_decisions_are_all_saved(tmp_path: Path, thread_server: Any) -> None:
    rows = [f"R{i:02d}" for i in range(30)]
    csv = "sku,item\n" + "".join(f"{sku},thing {sku}\n" for sku in rows)
    manifest = ran(thread_server(), tmp_path, csv=csv, seeds=2)
    picks = tmp_path / "jobs.picks.yaml"
    picks.write_text("".join(f"old/X{i}: {{reject: [{{seed: 0}}]}}\n" for i in range(2000)))
    statuses: list[int] = []
    with review(manifest, tmp_path) as url:
        threads = [threading.Thread(target=lambda sku=sku: statuses.append(
            post(url, {"asset": f"icons/{sku}", "variant": 1, "action": "pick"})))
            for sku in rows]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert statuses == [200] * len(rows)
    text = picks.read_text()
    for sku in rows:
        assert f"icons/{sku}: {{pick: {{seed: 1}}}}\n" in text, sku
    assert text.count("old/X") == 2000


def test_only_the_review_page_may_post_a_decision(tmp_path: Path, thread_server: Any) -> None:
    manifest = ran(thread_server(), tmp_path)
    picks = tmp_path / "jobs.picks.yaml"
    decision = {"asset": "icons/A1", "variant": 1, "action": "pick"}
    with review(manifest, tmp_path) as url:
        # What a page of another origin can send without a preflight.
        assert post(url, json.dumps(decision).encode(), {"Content-Type": "text/plain",
                                                         "Origin": "http://evil.test"}) >= 400
        assert post(url, json.dumps(decision).encode(), {"Content-Type": "text/plain"}) >= 400
        assert post(url, decision, {"Origin": "http://evil.test"}) >= 400
        assert not picks.exists()
        assert post(url, decision, {"Origin": url.rstrip("/")}) == 200
    assert picks.read_text() == "icons/A1: {pick: {seed: 1}}\n"


def test_a_decision_keeps_the_picks_files_comments(tmp_path: Path, thread_server: Any) -> None:
    manifest = ran(thread_server(), tmp_path)
    picks = tmp_path / "jobs.picks.yaml"
    picks.write_text("# art review, sprint 4\n\n"
                     "# the apple: keep the shine\n"
                     "icons/A1:\n  pick: {seed: 0}  # the shiny one\n"
                     "icons/B7: {reject: [{seed: 0}]}  # too dark\n")
    with review(manifest, tmp_path) as url:
        assert post(url, {"asset": "icons/A2", "variant": 1, "action": "pick"}) == 200
        assert post(url, {"asset": "icons/B7", "variant": 1, "action": "reject"}) == 200
    assert picks.read_text() == ("# art review, sprint 4\n\n"
                                 "# the apple: keep the shine\n"
                                 "icons/A1:\n  pick: {seed: 0}  # the shiny one\n"
                                 "icons/A2: {pick: {seed: 1}}\n"
                                 "icons/B7: {reject: [{seed: 0}, {seed: 1}]}\n")


# 1: a fast reviewer's decisions go to the asset each was made on


@needs_chromium
def test_fast_keys_decide_for_the_asset_in_focus_when_pressed(
    tmp_path: Path, thread_server: Any
) -> None:
    manifest = ran(thread_server(), tmp_path)
    picks = tmp_path / "jobs.picks.yaml"
    # A big picks file makes each answer take a moment: the keys run ahead of the answers.
    picks.write_text("".join(f"old/X{i}: {{reject: [{{seed: 0}}]}}\n" for i in range(5000)))
    with review(manifest, tmp_path) as url, browser_page() as page:
        page.goto(url)
        page.wait_for_selector(".variant")
        page.keyboard.press("x")  # reject seed 0 of icons/A1
        page.keyboard.press("ArrowDown")  # icons/A2 before the answer is back
        page.keyboard.press("p")  # pick seed 0 of icons/A2
        page.keyboard.press("ArrowDown")  # icons/B7
        page.keyboard.press("ArrowRight")
        page.keyboard.press("p")  # pick seed 1 of icons/B7
        saved(page, 3)
        names = page.eval_on_selector_all("section.asset", "els => els.map(e => e.dataset.name)")
        assert names == ["icons/A1", "icons/A2", "icons/B7"]
    mine = [line for line in picks.read_text().splitlines() if line.startswith("icons/")]
    assert mine == ["icons/A1: {reject: [{seed: 0}]}", "icons/A2: {pick: {seed: 0}}",
                    "icons/B7: {pick: {seed: 1}}"]


def test_the_published_name_pattern_is_what_publish_removes() -> None:
    from batcher.publish.publish import is_file_of

    assert is_file_of("icons/A1", "icons/A1.webp")
    assert is_file_of("icons/A1", "icons/A1@thumb.webp")
    assert not is_file_of("icons/A1", "icons/A1-notes.webp")
    assert not is_file_of("icons/A1", "icons/A2.webp")
    assert not is_file_of("icons/A1", "icons/A1")
    assert not is_file_of(".git/HEAD", ".git/HEAD.webp")
