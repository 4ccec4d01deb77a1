"""`batcher publish` with buckets (moto's S3 on 127.0.0.1): a folder run published to a bucket
with its derived sizes, a bucket run published to a folder (chat: <name>.txt), and a bucket to
bucket publish that removes exactly the files of a row that left."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path
from typing import Any

from conftest import provider_block, run_cli, write_manifest
from s3server import S3Server, s3, store_env

__all__ = ["s3"]  # the fixture, used by name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def icons_manifest(server: Any, folder: Path, output: str, csv: str) -> Path:
    (folder / "catalogue.csv").write_text(csv)
    text = f"name: shop\noutput: {output}\n" + provider_block(server) + textwrap.dedent("""\
        jobs:
          - name: icons
            type: image
            provider: test
            model: flux.1-schnell
            prompt: "an icon of {item}"
            vars_file: catalogue.csv
            asset: "icons/{sku}"
            seeds: 2
            params: {size: 256x256, response_format: b64_json}
            outputs: {format: webp, sizes: {thumb: 64}}
          - name: blurbs
            type: chat
            provider: test
            model: llama-3.1-8b-instruct
            prompt: "A line about {item}"
            vars_file: catalogue.csv
            asset: "text/{sku}"
            params: {max_tokens: 12}
        """)
    return write_manifest(folder, text)


CSV = "sku,item\nA1,a red apple\nA2,a green pear\n"


def check_listing(listing: dict[str, Any], read: Any) -> None:
    """Every file assets.json lists is there, with its bytes and sha256."""
    for entry in listing.values():
        for file in entry["files"]:
            data = read(file["path"])
            assert len(data) == file["bytes"] and sha(data) == file["sha256"], file["path"]


def test_a_folder_run_published_to_a_bucket_then_nothing_changed(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    env = store_env(s3.url, str(tmp_path / "cache"))
    manifest = icons_manifest(server, tmp_path, "out", CSV)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    bucket = s3.bucket()
    to = f"s3://{bucket}/game/v1"

    done = run_cli("publish", str(manifest), "--to", to, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    keys = s3.keys(bucket)
    assert sorted(keys) == ["game/v1/assets.json", "game/v1/icons/A1.webp",
                            "game/v1/icons/A1@thumb.webp", "game/v1/icons/A2.webp",
                            "game/v1/icons/A2@thumb.webp", "game/v1/text/A1.txt",
                            "game/v1/text/A2.txt"]
    listing = json.loads(s3.get(bucket, "game/v1/assets.json"))["assets"]
    check_listing(listing, lambda path: s3.get(bucket, f"game/v1/{path}"))
    assert s3.get(bucket, "game/v1/icons/A1.webp")[8:12] == b"WEBP"
    assert listing["text/A1"]["files"][0]["path"] == "text/A1.txt"

    again = run_cli("publish", str(manifest), "--to", to, cwd=tmp_path, env=env)

    assert again.returncode == 0, again.stderr
    assert "0 files written, 6 unchanged" in again.stdout
    assert "assets.json unchanged" in again.stdout


def test_a_bucket_run_published_to_a_folder_and_to_a_bucket(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    env = store_env(s3.url, str(tmp_path / "cache"))
    runs = s3.bucket()
    manifest = icons_manifest(server, tmp_path, f"s3://{runs}/runs/shop", CSV)
    first = run_cli("run", str(manifest), "--no-progress", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    (tmp_path / "jobs.picks.yaml").write_text("icons/A2: {pick: {seed: 1}}\n")

    done = run_cli("publish", str(manifest), "--to", "site", cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    site = tmp_path / "site"
    listing = json.loads((site / "assets.json").read_text())["assets"]
    assert listing["icons/A2"]["seed"] == 1 and listing["icons/A1"]["seed"] == 0
    check_listing(listing, lambda path: (site / path).read_bytes())
    assert (site / "text" / "A1.txt").read_text().strip()

    shop = s3.bucket()
    to = f"s3://{shop}/live"
    assert run_cli("publish", str(manifest), "--to", to, cwd=tmp_path,
                   env=env).returncode == 0
    s3.put(shop, "live/icons/notes.txt", b"the user's own")
    s3.put(shop, "live/other.bin", b"also theirs")
    manifest = icons_manifest(server, tmp_path, f"s3://{runs}/runs/shop",
                              "sku,item\nA1,a red apple\n")

    done = run_cli("publish", str(manifest), "--to", to, cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    assert sorted(s3.keys(shop)) == ["live/assets.json", "live/icons/A1.webp",
                                     "live/icons/A1@thumb.webp", "live/icons/notes.txt",
                                     "live/other.bin", "live/text/A1.txt"]
    assert sorted(json.loads(s3.get(shop, "live/assets.json"))["assets"]) == \
        ["icons/A1", "text/A1"]


def test_dry_run_writes_nothing_and_no_asset_job_is_exit_2(
    tmp_path: Path, thread_server: Any
) -> None:
    server = thread_server()
    manifest = icons_manifest(server, tmp_path, "out", CSV)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path).returncode == 0
    dry = run_cli("publish", str(manifest), "--to", "site", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "would write icons/A1.webp" in dry.stdout
    assert not (tmp_path / "site").exists()
    lines = manifest.read_text().splitlines(keepends=True)
    plain = write_manifest(tmp_path, "".join(line for line in lines if "asset:" not in line),
                           name="plain.yaml")
    done = run_cli("publish", str(plain), "--to", "site", cwd=tmp_path)
    assert done.returncode == 2 and "asset" in done.stderr
    assert not (tmp_path / "site").exists()


def test_within_one_bucket_the_files_are_copied_inside_the_store(
    tmp_path: Path, thread_server: Any, s3: S3Server
) -> None:
    server = thread_server()
    env = store_env(s3.url, str(tmp_path / "cache"))
    bucket = s3.bucket()
    manifest = icons_manifest(server, tmp_path, f"s3://{bucket}/runs/shop", CSV)
    assert run_cli("run", str(manifest), "--no-progress", cwd=tmp_path, env=env).returncode == 0

    done = run_cli("publish", str(manifest), "--to", f"s3://{bucket}/live", cwd=tmp_path, env=env)

    assert done.returncode == 0, done.stderr
    assert "6 files written (6 copied inside the store)" in done.stdout
    listing = json.loads(s3.get(bucket, "live/assets.json"))["assets"]
    check_listing(listing, lambda path: s3.get(bucket, f"live/{path}"))
    assert len([key for key in s3.keys(bucket) if key.startswith("live/")]) == 7
