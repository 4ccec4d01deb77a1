"""Asset sets (issue 20): names from a job's asset: template, picks and rejects, keep: N, and
`batcher publish` to a folder, against the built-in server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

from conftest import ledger_rows, provider_block, run_cli, write_manifest

CATALOGUE = "sku,item\nA1,a red apple\nA2,a green pear\nB7,a blue plum\n"


def catalogue_manifest(server: Any, folder: Path, *, asset: str = "icons/{sku}",
                       seeds: int = 2, extra: str = "", csv: str = CATALOGUE,
                       more_jobs: str = "") -> Path:
    (folder / "catalogue.csv").write_text(csv)
    jobs = f"""\
        jobs:
          - name: icons
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "an icon of {{item}}"
            vars_file: catalogue.csv
            asset: "{asset}"
            seeds: {seeds}
            params: {{size: 256x256, response_format: b64_json}}
        """
    text = ("name: shop\noutput: out\n" + provider_block(server) + textwrap.dedent(jobs)
            + textwrap.indent(textwrap.dedent(extra), "    ")
            + textwrap.indent(textwrap.dedent(more_jobs), "  "))
    return write_manifest(folder, text)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def generations(server: Any) -> int:
    return len(server.stats.matching("/images/generations"))


def ledger_file(folder: Path, task_id: str) -> bytes:
    row = next(r for r in ledger_rows(folder / "out", decode=True) if r["id"] == task_id)
    return (folder / "out" / row["files"][0][0]).read_bytes()


def test_names_from_a_csv_column_publish_to_a_folder(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    listing = json.loads((tmp_path / "site" / "assets.json").read_text())["assets"]
    assert sorted(listing) == ["icons/A1", "icons/A2", "icons/B7"]
    files = sorted(p.relative_to(tmp_path / "site").as_posix()
                   for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert files == ["assets.json", "icons/A1.png", "icons/A2.png", "icons/B7.png"]
    for name, entry in listing.items():
        assert entry["seed"] == 0  # no picks: the first ok variant
        assert entry["prompt"] == {"icons/A1": "an icon of a red apple",
                                   "icons/A2": "an icon of a green pear",
                                   "icons/B7": "an icon of a blue plum"}[name]
        (file,) = entry["files"]
        data = (tmp_path / "site" / file["path"]).read_bytes()
        assert file["bytes"] == len(data) and file["sha256"] == sha(data)
        assert data == ledger_file(tmp_path, entry["task_id"])
        assert entry["job"] == "icons" and entry["model"] == "flux.1-schnell"
    assert "20" not in json.dumps(listing).split("cost_usd")[0][:0]  # no timestamp field
    assert set(next(iter(listing.values()))) == {"files", "job", "model", "seed", "prompt",
                                                 "task_id", "cost_usd"}


def test_renaming_assets_costs_no_request(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    sent = generations(server)
    assert sent == 6
    manifest = catalogue_manifest(server, tmp_path, asset="sprites/{sku}-x")
    again = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert generations(server) == sent
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    assert (tmp_path / "site" / "sprites" / "A1-x.png").is_file()


def test_a_pick_changes_the_published_variant_and_rejects_skip(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    (tmp_path / "jobs.picks.yaml").write_text(
        "icons/A1: {pick: {seed: 1}}\nicons/A2: {reject: [{seed: 0}]}\n"
        "icons/B7: {reject: [{seed: 0}, {seed: 1}]}\n")
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 1  # B7 has no ok unrejected variant
    assert "icons/B7" in done.stderr and "rejected" in done.stderr
    listing = json.loads((tmp_path / "site" / "assets.json").read_text())["assets"]
    assert listing["icons/A1"]["seed"] == 1 and listing["icons/A2"]["seed"] == 1
    assert "icons/B7" not in listing
    data = (tmp_path / "site" / "icons" / "A1.png").read_bytes()
    assert data == ledger_file(tmp_path, listing["icons/A1"]["task_id"])
    assert not (tmp_path / "site" / "icons" / "B7.png").exists()


def test_a_publish_with_nothing_changed_rewrites_no_file(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    site = tmp_path / "site"
    stamps = {p: p.stat().st_mtime_ns for p in site.rglob("*") if p.is_file()}
    inodes = {p: p.stat().st_ino for p in stamps}
    again = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert again.returncode == 0
    assert "0 files written" in again.stdout and "assets.json unchanged" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert {p: p.stat().st_ino for p in stamps} == inodes


def test_a_removed_row_removes_exactly_its_files(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    site = tmp_path / "site"
    (site / "icons" / "README.txt").write_text("the user's own file")
    (site / "notes.md").write_text("mine")
    kept = (site / "icons" / "A1.png").stat().st_mtime_ns
    manifest = catalogue_manifest(server, tmp_path, csv="sku,item\nA1,a red apple\n"
                                  "B7,a blue plum\n")
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file())
    assert files == ["assets.json", "icons/A1.png", "icons/B7.png", "icons/README.txt",
                     "notes.md"]
    assert (site / "icons" / "A1.png").stat().st_mtime_ns == kept
    assert sorted(json.loads((site / "assets.json").read_text())["assets"]) == \
        ["icons/A1", "icons/B7"]


def test_keep_two_with_both_rejected_runs_exactly_the_next_two_seeds(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path, extra="keep: 2\n")
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    assert generations(server) == 6
    (tmp_path / "jobs.picks.yaml").write_text("icons/A2: {reject: [{seed: 0}, {seed: 1}]}\n")
    plan = run_cli("plan", str(manifest), cwd=tmp_path)
    assert plan.returncode == 0
    total = next(line for line in plan.stdout.splitlines() if line.startswith("total"))
    assert total.split()[1:5] == ["8", "6", "0", "2"]  # total, done, failed, to run
    again = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert generations(server) == 8
    rows = ledger_rows(tmp_path / "out")
    new = [row for row in rows if row["seed"] not in (0, 1)]
    assert sorted(row["seed"] for row in new) == [2, 3] and len(rows) == 8
    assert all("green pear" in row["prompt"] for row in new)
    # Enough now: a third run sends nothing, and publish takes the first unrejected.
    third = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path)
    assert third.returncode == 0 and generations(server) == 8
    assert run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path).returncode == 0
    listing = json.loads((tmp_path / "site" / "assets.json").read_text())["assets"]
    assert listing["icons/A2"]["seed"] == 2


def test_stale_picks_are_warnings(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    (tmp_path / "jobs.picks.yaml").write_text(
        "icons/A1: {pick: {seed: 1}}\nicons/ZZ: {pick: {seed: 0}}\n"
        "icons/A2: {reject: [{seed: 9}]}\n")
    done = run_cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "icons/ZZ" in done.stderr and "seed 9" in done.stderr
    assert "icons/A1" not in done.stderr
    assert (tmp_path / "jobs.picks.yaml").read_text().startswith("icons/A1: {pick: {seed: 1}}")


def test_a_bad_picks_file_is_exit_2_with_nothing_written(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    (tmp_path / "jobs.picks.yaml").write_text("icons/A1: {pick: {seed: 1}}\n"
                                               "icons/A2: {pick: {seed: one}}\n")
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 2
    assert "jobs.picks.yaml:2" in done.stderr and "icons/A2.pick.seed" in done.stderr
    assert not (tmp_path / "site").exists()


def test_bad_names_are_manifest_errors_at_the_row(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    csv = "sku,item\nA1,a red apple\n../up,a green pear\n"
    manifest = catalogue_manifest(server, tmp_path, csv=csv)
    done = run_cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 2
    assert "catalogue.csv:3" in done.stderr and "sku" in done.stderr
    for bad in ("/abs/{sku}", "icons/{sku} big", "a//{sku}"):
        manifest = catalogue_manifest(server, tmp_path, asset=bad)
        done = run_cli("validate", str(manifest), cwd=tmp_path)
        assert done.returncode == 2, bad
        assert "asset" in done.stderr or "sku" in done.stderr
    manifest = catalogue_manifest(server, tmp_path, asset="icons/{colour}")
    done = run_cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 2 and "colour" in done.stderr


def test_two_jobs_giving_one_name_is_a_manifest_error(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    text = "name: two\noutput: out\n" + provider_block(server) + textwrap.dedent("""\
        jobs:
          - name: one
            type: image
            provider: test
            model: m
            prompts: ["a cat {n}"]
            vars: {n: [1, 2]}
            asset: "pets/cat{n}"
          - name: two
            type: image
            provider: test
            model: m
            prompt: "another cat"
            asset: "pets/cat2"
        """)
    manifest = write_manifest(tmp_path, text)
    done = run_cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 2
    assert "jobs[1].asset" in done.stderr and "pets/cat2" in done.stderr


def test_status_markdown_counts_failures_and_assets(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    broken = """\
        - name: broken
          type: image
          provider: test
          model: flux.1-schnell
          prompt: "a | pipe"
          params: {size: 64x64}
        """
    manifest = catalogue_manifest(server, tmp_path, more_jobs=broken)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 1
    (tmp_path / "jobs.picks.yaml").write_text(
        "icons/A1: {pick: {seed: 1}}\nicons/B7: {reject: [{seed: 0}, {seed: 1}]}\n")

    done = run_cli("status", str(manifest), "--markdown", cwd=tmp_path)

    assert done.returncode == 1  # a task failed: a CI step can gate on it
    text = done.stdout
    assert "**6 ok**, 1 failed, 0 pending of 7" in text
    assert "| icons | flux.1-schnell | 6 | 0 | 0 |" in text
    assert "#### Failures by reason" in text and "| 1 | http_400" in text
    assert "3 assets: 2 with a variant to publish, 1 without an ok unrejected variant, " \
           "2 undecided (no pick)" in text
    without = text.split("Without an ok unrejected variant (1)")[1].split("</details>")[0]
    assert "`icons/B7`" in without and "A2" not in without
    undecided = text.split("Undecided (2)")[1].split("</details>")[0]
    assert "`icons/A2`" in undecided and "`icons/B7`" in undecided and "A1" not in undecided


def test_an_assets_json_naming_a_file_outside_the_target_removes_nothing(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    (tmp_path / "precious.txt").write_text("keep me")
    site = tmp_path / "site"
    site.mkdir()
    (site / "assets.json").write_text(json.dumps({"assets": {"x": {"files": [
        {"path": "../precious.txt", "bytes": 7, "sha256": "0" * 64}]}}}))
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 2 and "../precious.txt" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in site.iterdir()) == ["assets.json"]


def test_validate_takes_a_pick_of_a_seed_keep_may_add_as_current(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = catalogue_manifest(server, tmp_path, extra="keep: 2\n")
    (tmp_path / "jobs.picks.yaml").write_text("icons/A1: {pick: {seed: 3}}\n"
                                              "icons/A2: {pick: {seed: 8}}\n")
    done = run_cli("validate", str(manifest), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "icons/A1" not in done.stderr  # seed 3 is within max_seeds (4 x 2)
    assert "icons/A2: pick {seed 8} matches no variant" in done.stderr


def test_the_images_of_n_2_are_variants_picked_by_image(tmp_path: Path, thread_server: Any) -> None:
    server = thread_server()
    text = "name: two\noutput: out\n" + provider_block(server) + textwrap.dedent("""\
        jobs:
          - name: pair
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "a lantern"
            asset: "lamp"
            params: {size: 256x256, n: 2, response_format: b64_json}
        """)
    manifest = write_manifest(tmp_path, text)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    (row,) = ledger_rows(tmp_path / "out", decode=True)
    second = (tmp_path / "out" / row["files"][1][0]).read_bytes()
    assert second != (tmp_path / "out" / row["files"][0][0]).read_bytes()
    (tmp_path / "jobs.picks.yaml").write_text("lamp: {pick: {image: 2}}\n")
    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "lamp.png").read_bytes() == second
    (tmp_path / "jobs.picks.yaml").write_text("lamp: {pick: {seed: null}}\n")
    ambiguous = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path)
    assert ambiguous.returncode == 2 and "matches 2 variants" in ambiguous.stderr
